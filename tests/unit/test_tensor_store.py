"""TensorStore and shared-memory refs in one process: transport choice, zero copy, leases, reaping, errors."""

from __future__ import annotations

import os

import pytest
import torch

from mmserve import transport
from mmserve.transport import TensorRefError, TensorStore, TensorUnavailable, from_ref, shm
from mmserve.v1 import tensor_pb2


def big(dtype=torch.float32) -> torch.Tensor:
    return torch.randn(64, 33).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8, torch.int64], ids=str)
def test_shm_round_trip(store, dtype):
    x = big(dtype)
    ref = store.to_ref(x)
    assert ref.WhichOneof("location") == "shared_memory"
    assert ref.shared_memory.nbytes == x.numel() * x.element_size()
    assert ref.shared_memory.name.startswith(store.prefix)
    assert torch.equal(from_ref(ref), x)


def test_small_and_empty_tensors_stay_inline(store):
    assert store.to_ref(torch.zeros(16)).WhichOneof("location") == "inline_data"
    assert store.to_ref(torch.zeros(0, 4096)).WhichOneof("location") == "inline_data"


def test_policy_inline_never_uses_shm():
    s = TensorStore("inline", inline_limit_bytes=0)
    assert s.to_ref(big()).WhichOneof("location") == "inline_data"
    s.close()


def test_auto_uses_shm_only_for_callers_on_this_host():
    s = TensorStore("auto", inline_limit_bytes=0)
    try:
        assert s.to_ref(big()).WhichOneof("location") == "inline_data"  # caller unknown
        token = transport.caller_domain.set("another-host:1")
        assert s.to_ref(big()).WhichOneof("location") == "inline_data"
        transport.caller_domain.reset(token)
        token = transport.caller_domain.set(shm.domain())
        assert s.to_ref(big()).WhichOneof("location") == "shared_memory"
        transport.caller_domain.reset(token)
    finally:
        s.close()


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="transport"):
        TensorStore("carrier-pigeon")


def test_consumer_maps_without_copy_and_its_writes_stay_private(store):
    x = big()
    ref = store.to_ref(x)
    name = ref.shared_memory.name
    back = from_ref(ref)
    assert not os.path.exists(shm.SHM_DIR / name), "mapping releases the lease by unlinking the segment"
    assert store.num_live_leases() == 0
    back += 1  # copy-on-write: nobody else sees it
    assert torch.equal(back, x + 1)


def test_a_ref_is_consumed_once(store):
    ref = store.to_ref(big())
    from_ref(ref)
    with pytest.raises(TensorUnavailable, match="gone"):
        from_ref(ref)


def test_empty_tensor_lives_in_shm_and_hands_off_without_copy(store):
    out = store.empty((64, 33), torch.float32)
    out.copy_(torch.arange(64 * 33, dtype=torch.float32).reshape(64, 33))
    assert len(shm.list_segments(store.prefix)) == 1
    ref = store.to_ref(out)
    assert ref.shared_memory.name == shm.list_segments(store.prefix)[0]
    assert torch.equal(from_ref(ref), out)


def test_dropped_empty_tensor_frees_its_segment(store):
    out = store.empty((64, 33), torch.float32)
    view = out[1:]
    del out
    assert len(shm.list_segments(store.prefix)) == 1  # the view keeps the mapping
    del view
    assert shm.list_segments(store.prefix) == []


def test_view_of_an_empty_tensor_is_copied(store):
    out = store.empty((64, 33), torch.float32)
    out.fill_(2.0)
    ref = store.to_ref(out[:32])
    assert ref.shared_memory.nbytes == 32 * 33 * 4
    assert torch.equal(from_ref(ref), torch.full((32, 33), 2.0))
    assert torch.equal(out, torch.full((64, 33), 2.0))


def test_unclaimed_lease_expires(store, clock):
    ref = store.to_ref(big())
    assert store.num_live_leases() == 1
    clock.now += 9.9
    assert store.reap() == pytest.approx(0.1)
    assert store.num_live_leases() == 1
    clock.now += 0.1
    assert store.reap() is None
    assert store.num_live_leases() == 0 and store.num_expired == 1
    with pytest.raises(TensorUnavailable):
        from_ref(ref)


def test_claimed_lease_is_not_live_and_does_not_count_as_expired(store, clock):
    from_ref(store.to_ref(big()))
    clock.now += 60
    store.reap()
    assert store.num_live_leases() == 0 and store.num_expired == 0


def test_close_unlinks_unclaimed_segments(clock):
    s = TensorStore("shm", inline_limit_bytes=0, clock=clock)
    ref = s.to_ref(big())
    kept = s.empty((8, 8), torch.float32)
    assert len(shm.list_segments(s.prefix)) == 2
    s.close()
    assert shm.list_segments(s.prefix) == []
    with pytest.raises(TensorUnavailable):
        from_ref(ref)
    assert kept.shape == (8, 8)  # the producer's own mapping stays valid


def test_wait_idle_wakes_when_leases_expire():
    s = TensorStore("shm", inline_limit_bytes=0, lease_s=0.05)
    s.start()
    try:
        s.to_ref(big())
        assert s.wait_idle(timeout_s=30)
        assert s.num_expired == 1
    finally:
        s.close()


def test_shm_failure_falls_back_to_inline(store, monkeypatch):
    def full(name, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shm, "write", full)
    x = big()
    ref = store.to_ref(x)
    assert ref.WhichOneof("location") == "inline_data"
    assert torch.equal(from_ref(ref), x)


def test_orphans_of_dead_processes_are_reaped_and_live_ones_kept():
    dead = f"mmserve-{shm._pid_namespace()}-999999999-1-0"  # no such pid
    live = f"{shm.owner_prefix()}999999"
    for name in (dead, live):
        shm.write(name, memoryview(b"x"))
    try:
        assert dead in shm.reap_orphans()
        assert not shm.exists(dead) and shm.exists(live)
    finally:
        shm.unlink(dead)
        shm.unlink(live)


def shm_ref(name="mmserve-1-2-3-4", nbytes=8, domain=None) -> tensor_pb2.TensorRef:
    return tensor_pb2.TensorRef(dtype="float32", shape=[2], shared_memory=tensor_pb2.SharedMemoryRef(
        name=name, nbytes=nbytes, domain=shm.domain() if domain is None else domain))


@pytest.mark.parametrize("name", ["../etc/passwd", "mmserve-1-2-3", "other-1-2-3-4", "mmserve-1-2-3-4/x", ""])
def test_names_that_are_not_ours_are_invalid(name):
    with pytest.raises(TensorRefError, match="segment name"):
        from_ref(shm_ref(name=name))


def test_size_mismatch_is_invalid():
    with pytest.raises(TensorRefError, match="does not fit"):
        from_ref(shm_ref(nbytes=12))


def test_segment_of_another_host_is_unavailable():
    with pytest.raises(TensorUnavailable, match="another host"):
        from_ref(shm_ref(domain="some-other-boot-id:42"))


def test_missing_segment_is_unavailable():
    with pytest.raises(TensorUnavailable, match="gone"):
        from_ref(shm_ref(name="mmserve-1-2-3-999999999"))


def test_unavailable_is_not_invalid_argument():
    assert not issubclass(TensorUnavailable, ValueError)


def test_concat_of_mixed_transports(store):
    a, b = big(), big()
    ref = transport.concat([transport.to_inline(a), store.to_ref(b)])
    assert list(ref.shape) == [128, 33]
    assert torch.equal(from_ref(ref), torch.cat([a, b]))


def test_concat_of_one_is_that_ref():
    ref = transport.to_inline(big())
    assert transport.concat([ref]) is ref


@pytest.mark.parametrize("parts", [
    [],
    [torch.zeros(2, 3), torch.zeros(2, 4)],
    [torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64)],
], ids=["none", "trailing-shape", "dtype"])
def test_concat_refuses_parts_that_do_not_fit(parts):
    with pytest.raises(TensorRefError, match="concat"):
        transport.concat([transport.to_inline(p) for p in parts])


def test_concat_with_a_lying_shape_is_invalid():
    ref = transport.concat([transport.to_inline(torch.zeros(2, 3))] * 2)
    ref.shape[0] = 5
    with pytest.raises(TensorRefError, match="concat"):
        from_ref(ref)


# --- remote pull: the producer side ----------------------------------------------------------------------------

def test_auto_uses_remote_only_for_our_callers_elsewhere(served):
    def location(caller: str) -> str:
        token = transport.caller_domain.set(caller)
        try:
            return served.to_ref(big()).WhichOneof("location")
        finally:
            transport.caller_domain.reset(token)

    assert location("") == "inline_data"  # an unknown caller may not speak our pull protocol
    assert location("another-host:1") == "remote"
    assert location(shm.domain()) == ("shared_memory" if shm.domain() else "remote")
    assert served.to_ref(torch.zeros(16)).WhichOneof("location") == "inline_data"  # small


def test_auto_without_an_address_stays_inline_for_callers_elsewhere():
    s = TensorStore("auto", inline_limit_bytes=0)
    token = transport.caller_domain.set("another-host:1")
    try:
        assert s.to_ref(big()).WhichOneof("location") == "inline_data"
    finally:
        transport.caller_domain.reset(token)
        s.close()


def test_policy_remote_forces_remote_even_on_this_host(clock):
    s = TensorStore("remote", inline_limit_bytes=1024, clock=clock)
    s.address = "127.0.0.1:1"
    token = transport.caller_domain.set(shm.domain())
    try:
        x = big()
        ref = s.to_ref(x)
        assert ref.WhichOneof("location") == "remote"
        assert ref.remote.address == "127.0.0.1:1" and ref.remote.nbytes == x.numel() * 4
        assert len(ref.remote.handle_id) == 32 and s.num_live_leases() == 1
        assert s.empty((64, 33), torch.float32).untyped_storage().nbytes() == 64 * 33 * 4
        assert shm.list_segments(s.prefix) == []
    finally:
        transport.caller_domain.reset(token)
        s.close()


def test_a_held_tensor_is_claimed_once_and_its_lease_ends_with_the_pull(served):
    token = transport.caller_domain.set("another-host:1")
    x = big()
    ref = served.to_ref(x)
    transport.caller_domain.reset(token)
    held = served.claim(ref.remote.handle_id)
    assert torch.equal(held, x)
    assert served.claim(ref.remote.handle_id) is None
    assert served.num_live_leases() == 1  # the pull is still streaming
    served.end_pull()
    assert served.num_live_leases() == 0 and served.num_expired == 0


def test_unpulled_remote_lease_expires(served, clock):
    handle = served.hold(big())
    clock.now += 9.9
    assert served.reap() == pytest.approx(0.1)
    clock.now += 0.1
    assert served.reap() is None
    assert served.num_live_leases() == 0 and served.num_expired == 1
    assert served.claim(handle) is None


def test_release_ends_leases_and_ignores_unknown_handles(served):
    handles = [served.hold(big()) for _ in range(3)]
    assert served.release([handles[0], handles[2], "not-a-handle"]) == 2
    assert served.num_live_leases() == 1
    served.close()
    assert served.num_live_leases() == 0 and served.claim(handles[1]) is None


def test_a_held_view_does_not_pin_its_whole_storage(served):
    whole = torch.zeros(1024, 1024)
    handle = served.hold(whole[:2])
    assert served.claim(handle).untyped_storage().nbytes() == 2 * 1024 * 4
    served.end_pull()


def test_wait_idle_wakes_when_a_held_tensor_is_released():
    s = TensorStore("remote", inline_limit_bytes=0, lease_s=600)
    s.start()
    try:
        handle = s.hold(big())
        assert not s.wait_idle(timeout_s=0)
        s.release([handle])
        assert s.wait_idle(timeout_s=30)
    finally:
        s.close()


def test_the_callers_gpus_ride_after_its_domain_and_do_not_hide_it(served):
    from mmserve.transport import store as store_module

    token = transport.caller_domain.set(f"{shm.domain()}|GPU-a,GPU-b")
    try:
        assert store_module.caller_gpus() == {"GPU-a", "GPU-b"}
        assert served.to_ref(big()).WhichOneof("location") == ("shared_memory" if shm.domain() else "remote")
    finally:
        transport.caller_domain.reset(token)
    assert store_module.caller_gpus() == set()


def test_a_cpu_process_declares_no_gpus():
    from mmserve.transport import cuda_ipc

    (header,) = transport.caller_metadata()
    assert header[0] == transport.CALLER_DOMAIN_HEADER
    assert ("|" in header[1]) == bool(cuda_ipc.visible_gpus())
