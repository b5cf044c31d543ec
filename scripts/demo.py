"""`make demo`: tiny model, a sample clip, the stack up, one video question answered, the stack down."""

from __future__ import annotations

import pathlib
import signal
import subprocess
import sys

from stack.ports import free_port
from mmserve.media.samples import make_video

CACHE = pathlib.Path(__file__).resolve().parent.parent / ".cache"


def main() -> int:
    model = CACHE / "tiny-model"
    if not (model / "config.json").exists():
        from mmserve.models.tiny import build_tiny_model

        print(f"building a tiny random-weight Qwen2.5-VL checkpoint in {model} ...")
        build_tiny_model(model, seed=0)
    clip = CACHE / "sample.mp4"
    if not clip.exists():
        print(f"generating a 4 s sample clip in {clip} ...")
        clip.write_bytes(make_video(seconds=4.0, fps=30, width=320, height=240))
    port = free_port()
    print("starting decoder, encoder, llm, router and redis ...")
    up = subprocess.Popen([sys.executable, "-m", "stack.cli", "up", "--model", str(model), "--port", str(port),
                           "--log-level", "WARNING"], stdout=subprocess.PIPE, text=True)
    try:
        line = up.stdout.readline()
        if "listening" not in line:
            print("the stack did not start", file=sys.stderr)
            return 1
        print(line.strip())
        prompt = "What happens in this video?"
        print(f"\n> {prompt} [video: {clip.name}]\n")
        # Random weights: the answer is gibberish by design; the point is the path it took.
        return subprocess.call([sys.executable, "-m", "stack.cli", "generate", "--addr", f"127.0.0.1:{port}",
                                "--prompt", prompt, "--video", str(clip), "--max-tokens", "48"])
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=60)
        print("\nstack stopped")


if __name__ == "__main__":
    sys.exit(main())
