"""Run by tests/test_resume.py as a real process: personalize the tiny pipeline, maybe SIGKILL itself.

Prints `STEP n` after each step it runs (flushed, so a killed run's output is complete up to the
kill), the library's log lines (INFO, on stdout), and `SAVED path` once the adapter is written.
With `kill_at`, the step callback kills this very process with SIGKILL at that step: no cleanup,
no `finally`, exactly like the out-of-memory killer or a pulled plug.

Usage: python tests/scripts/resume_run.py OUTPUT_DIR ADAPTER_PATH JSON
(JSON: `personalize` keywords, plus `kill_at`, `subject_images` (how many of conftest's images) and
`family`, whose tiny pipeline to train (default "sd").)
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for conftest's subject images


def main() -> None:
    import torch
    from conftest import make_subject_images

    from db_adapters import personalize
    from db_adapters.testing import tiny_pipeline_of

    # The uninterrupted run it is compared with uses one thread too: same kernels, same sums.
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(levelname)s %(message)s")
    for noisy in ("diffusers", "transformers", "accelerate", "peft"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    output_dir, adapter_path, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    kill_at = settings.pop("kill_at", None)
    images = make_subject_images(settings.pop("subject_images", 3))
    family = settings.pop("family", "sd")

    def on_step(step: int, logs: dict) -> None:
        print(f"STEP {step}", flush=True)
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    adapter = personalize(tiny_pipeline_of(family), images, "dog", output_dir=output_dir, callback=on_step, **settings)
    adapter.save(adapter_path)
    print(f"SAVED {adapter_path}", flush=True)


if __name__ == "__main__":
    main()
