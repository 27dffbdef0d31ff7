"""Train a latent edge predictor from the command line (the AtelierTrainLEP node, run headless).

    python tools/train_lep.py --images /data/sketches --checkpoint v1-5-pruned-emaonly.safetensors --name my_lep
    python tools/train_lep.py --images /tmp/world --make-world 64 --tiny sd15 --steps 50 --batch-size 4
    python tools/train_lep.py --images /tmp/world --make-world 8 --tiny flux --steps 50 --batch-size 4   # a DiT family

--images is a folder of images with captions (<image>.txt, else the file name); ComfyUI's input folder is
pointed at its parent for this run. The predictor lands in ComfyUI's models/atelier/lep/<name>.safetensors;
Ctrl+C between steps leaves the resumable checkpoint of the last --save-every, and running the same command
again resumes. --make-world N first writes N images of Atelier's generated world (with captions) there.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE.parent]
sys.path.insert(0, str(HERE))


def make_world(folder: Path, n: int, size: int, module) -> None:
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    for s in module.iter_samples(0, 0, n, size=size):
        Image.fromarray(s.image).save(folder / f"world_{s.index:05d}.png")
        (folder / f"world_{s.index:05d}.txt").write_text(s.caption)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True, help="folder of images with captions")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint file name in ComfyUI's models/checkpoints")
    src.add_argument("--tiny", choices=["sd15", "sdxl", "pixart", "flux", "flux_schnell", "sd3"],
                     help="Atelier's tiny seeded model (tests, demos)")
    ap.add_argument("--name", default="my_lep")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--resolution", type=int, default=0, help="0: the model's native size")
    ap.add_argument("--edges", choices=["canny", "sobel"], default="canny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--restart", action="store_true", help="ignore a resumable checkpoint / finished file")
    ap.add_argument("--make-world", type=int, default=0, metavar="N")
    ap.add_argument("--cpu", action="store_true")
    ns = ap.parse_args(argv)

    images = Path(ns.images).resolve()
    if ns.make_world:
        from pure_models import load_models
        size = {"sd15": 64, "pixart": 320, None: 512}.get(ns.tiny, 128)   # the tiny families' native sizes
        make_world(images, ns.make_world, size, load_models("world"))
    if not images.is_dir():
        print(f"--images: {images} is not a folder", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import headless
    h = headless.Headless(input_dir=str(images.parent), output_dir=str(HERE.parent / "out" / "train_lep"),
                          cpu=ns.cpu or None)
    loader = ({"class_type": "AtelierTinyCheckpointLoader", "inputs": {"family": ns.tiny, "seed": 0}} if ns.tiny
              else {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ns.checkpoint}})
    prompt = {
        "1": loader,
        "2": {"class_type": "AtelierTrainLEP", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "folder": images.name, "name": ns.name,
            "steps": ns.steps, "batch_size": ns.batch_size, "learning_rate": ns.lr, "resolution": ns.resolution,
            "edge_method": ns.edges, "seed": ns.seed, "resume": not ns.restart, "save_every": ns.save_every}},
    }
    h.run_prompt(prompt)
    report = h.executor.caches.outputs.get("2")
    print(report[1][0] if report else "done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
