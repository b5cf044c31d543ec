"""mmserve: disaggregated serving for multimodal LLMs (shared code used by every service)."""

import os

# gRPC's fork handlers restart its poller thread inside the child of every fork, and subprocess.Popen then
# closes that child's descriptors before exec: the poller hits EBADF and the child aborts (SIGABRT) before it
# becomes the service we started (grpc/grpc#43055; seen as "encoder exited during start-up (signal 6)").
# Nothing of ours uses gRPC in a forked child without exec (decoder workers fork from a gRPC-free
# forkserver), so the handlers are off. gRPC reads this when it is first imported: import mmserve before grpc.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

__version__ = "0.1.0"
