"""DreamBooth on Stable Diffusion 1.5 from the hub, on a GPU: the paper's recipe with LoRA.

    python examples/sd15_dreambooth.py --images dog/ --class-noun dog --output my_dog.safetensors

Needs a CUDA GPU with ~10 GB (LoRA, fp16 mixed precision) and network access to the hub, or a hub
cache that already holds the model. `--model` accepts any SD 1.x/2.x diffusers folder or hub id.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import StableDiffusionPipeline

from db_adapters import personalize
from db_adapters.generation import grid, render


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
    parser.add_argument("--images", required=True, help="folder of 3-5 photos of the subject")
    parser.add_argument("--class-noun", required=True)
    parser.add_argument("--output", default="subject.safetensors")
    parser.add_argument("--output-dir", default="runs/sd15", help="class-image cache and previews")
    parser.add_argument("--strategy", default="lora")
    parser.add_argument("--steps", type=int, default=None, help="default 800")
    parser.add_argument("--num-class-images", type=int, default=None, help="default 200")
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    on_gpu = args.device.startswith("cuda")
    pipe = StableDiffusionPipeline.from_pretrained(args.model, use_safetensors=True).to(args.device)
    adapter = personalize(
        pipe,
        args.images,
        args.class_noun,
        strategy=args.strategy,
        steps=args.steps,
        num_class_images=args.num_class_images,
        mixed_precision="fp16" if on_gpu else "no",
        gradient_checkpointing=on_gpu,
        output_dir=args.output_dir,
        validation_prompts=["a {id} " + args.class_noun + " on the beach"],
        validation_every=200 if on_gpu else None,
        class_inference_steps=args.sample_steps,
    )
    adapter.save(args.output)
    prompt = f"a {adapter.identifier} {args.class_noun} on the beach"
    grid(render(pipe, prompt, num_images=4, steps=args.sample_steps)).save(f"{args.output_dir}/beach.png")
    print(f"saved {args.output}; identifier {adapter.identifier!r}; samples in {args.output_dir}/beach.png")


if __name__ == "__main__":
    main()
