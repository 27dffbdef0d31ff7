"""Train Atelier Mini kNN: an image-embedding path on Atelier Mini (issue 20, item 5).

    nohup nice -n 5 python tools/train_mini_knn.py > out/train_mini_knn.log 2>&1 &

Two models, written together to ``weights/atelier_mini_knn.safetensors`` (``models/mini_format.py``:
8-bit weights, used token rows only), next to Mini sd15, whose text encoder and VAE they reuse:

  1. open_clip: the toy open_clip of ``tiny_family.TINY_OPEN_CLIP`` (both towers, 32-d, 32 px images,
     16 text tokens), trained contrastively (symmetric InfoNCE; identical captions in a batch count as
     positives) on world images and their captions, so that its image embedding holds the colours,
     shapes and layout a caption names and a text query finds images showing it. Its projections are
     then rescaled so image embeddings have unit RMS per dimension (cosine retrieval is unchanged; the
     unCLIP noise augmentation assumes unit scale, as ComfyUI's noise augmentor without CLIP statistics
     does).
  2. unet: the SD2.1-unCLIP topology of ``tiny_family.TinySD21UnCLIP`` (eps-prediction, SD1.5 latent
     format), trained on Mini sd15's latents (its VAE, frozen) and text encoder (frozen), conditioned as
     unCLIP is: ADM = [noise-augmented image embedding of the *same* image, noise-level embedding],
     exactly as ``comfy.model_base.unclip_adm`` builds it at sampling time; random augmentation levels,
     10% image dropout (ADM zeros, what a conditioning without unclip_conditioning gives, for CFG) and
     30% caption dropout (so the picture follows the image embedding, not only the words).
Every random draw comes from generators seeded by (seed, step); both phases checkpoint (safetensors + JSON,
no pickle) to ``out/mini_ckpt/knn_seed<seed>/`` and resume with --resume.

Fine-tuning a shipped file (``--init weights/atelier_mini_knn.safetensors``): the open_clip is taken as it is
(no phase 1: the embeddings, hence every index built with it, stay what they were) and the UNet phase starts
from the file's UNet, here with ``--caption-drop`` / ``--colour-drop`` (the caption with its colour words
removed, ``world.without_colours``: the text names shapes and layout, the colours must come from the image
embedding) and ``--lr``; checkpoints go to ``out/mini_ckpt/knn_seed<seed>_ft/``. The shipped file is the first
run (3000 UNet steps, ``--data 6000``) fine-tuned so (its metadata says which file it started from):

    nice -n 5 python tools/train_mini_knn.py --init weights/atelier_mini_knn.safetensors --steps 900 --data 6000 \
        --colour-drop 0.5 --caption-drop 0.3 --lr 5e-4 --every 100
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import train_mini as tm  # noqa: E402  (fixes sys.path for tools/ itself)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

log = logging.getLogger("atelier.train_mini_knn")

FAMILY = "knn"            # the Mini kNN file's family tag (format metadata)
BASE_FAMILY = "sd15"      # the Mini file whose text encoder and VAE the unCLIP model reads
PX = 64
CLIP_LR = 2e-3
UNET_LR = 1e-3
IMAGE_DROP = 0.1
CAPTION_DROP = 0.3
MAX_AUG_LEVEL = 400       # training noise-augmentation levels 0..MAX_AUG_LEVEL-1 (of 1000)
OPEN_CLIP_TOKEN_KEY = "token_embedding.weight"


def open_clip_config(tiny) -> dict:
    """tiny_family.TINY_OPEN_CLIP with a 2-layer image tower: ComfyUI's CLIP vision model (which the Mini unCLIP
    loader builds from it) reads the penultimate layer, so it needs two."""
    cfg = json.loads(json.dumps(tiny.TINY_OPEN_CLIP))
    cfg["vision_cfg"]["layers"] = 2
    return cfg


def modules():
    """(pkg name, tiny_family, world, mini_format, knn_embed) of the booted pack or a bare import."""
    import headless
    h = headless.Headless.current()
    pkg = h.pack_module.__name__ if h is not None else tm._import_pack()
    imp = importlib.import_module
    return (pkg, imp(pkg + ".nodes.tiny_family"), imp(pkg + ".models.world"), imp(pkg + ".models.mini_format"),
            imp(pkg + ".models.knn_embed"))


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_base(tiny, fmt, path: Path):
    """Mini sd15's CLIP (ComfyUI object) and TAESD module, frozen."""
    import comfy.taesd.taesd
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        parts = fmt.unpack({k: f.get_tensor(k) for k in f.keys()})
    clip = tiny.build_clip(BASE_FAMILY, 0)
    clip.cond_stage_model.load_state_dict(parts["clip"], strict=True)
    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    taesd.load_state_dict(parts["vae"], strict=True)
    for m in (clip.cond_stage_model, taesd):
        m.eval().requires_grad_(False)
    return clip, taesd


# ------------------------------------------------------------------------------------------
# phase 1: open_clip

def clip_inputs(knn_embed, images) -> torch.Tensor:
    """(N, 3, S, S) normalised inputs, exactly as OpenClipEmbedder.embed_images prepares them."""
    out = []
    mean = torch.tensor(knn_embed.OPENAI_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(knn_embed.OPENAI_STD).view(1, 3, 1, 1)
    for i in range(0, len(images), 512):
        batch = torch.from_numpy(images[i:i + 512]).float().div_(255.0)
        sq = knn_embed.to_square_batch([batch], 32).movedim(-1, 1)
        out.append((sq - mean) / std)
    return torch.cat(out)


def train_clip(model, pixels, text_tokens, caption_ids, seed, steps, batch, ckpt, every, resume, curve):
    from tqdm import tqdm
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    model.train()
    opt = torch.optim.AdamW(params, lr=CLIP_LR, weight_decay=0.01)
    start, prev = tm.resume_phase(ckpt, "open_clip", opt, curve, model.load_state_dict, log) if resume and ckpt \
        else (0, 0.0)
    n = pixels.shape[0]
    t0 = time.time() - prev
    avg = None
    for step in tqdm(range(start, steps), desc="open_clip", initial=start, total=steps, mininterval=10):
        g = tm.gen(seed, 11, step)
        idx = torch.randint(0, n, (batch,), generator=g)
        tm.set_lr(opt, CLIP_LR, step, steps, min(100, steps // 10 + 1))
        img = F.normalize(model.encode_image(pixels[idx]), dim=-1)
        txt = F.normalize(model.encode_text(text_tokens[idx]), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        cid = caption_ids[idx]
        target = (cid[:, None] == cid[None, :]).float()
        target = target / target.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-target * F.log_softmax(logits.T, 1), 1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if (step + 1) % 50 == 0:
            curve.append([step + 1, round(avg, 4)])
            log.info("open_clip step %d loss %.4f", step + 1, avg)
        if ckpt and ((step + 1) % every == 0 or step + 1 == steps):
            ckpt.save("open_clip", step + 1, model.state_dict(), opt, {"curve": curve, "seconds": time.time() - t0})
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return {"loss": avg if avg is not None else (curve[-1][1] if curve else None), "seconds": time.time() - t0}


@torch.no_grad()
def embed_all(model, pixels, batch=512) -> torch.Tensor:
    return torch.cat([model.encode_image(pixels[i:i + batch]) for i in range(0, len(pixels), batch)]).float()


@torch.no_grad()
def unit_rms(model, pixels) -> float:
    """Rescale both projections so the image embeddings have RMS 1 per dimension; return the factor."""
    e = embed_all(model, pixels)
    s = float(e.pow(2).mean().sqrt())
    model.visual.proj.div_(s)
    model.text_projection.div_(s)
    return s


@torch.no_grad()
def retrieval_accuracy(model, pixels, text_tokens, caption_ids, n=512) -> float:
    """Top-1 text->image accuracy (a hit: the found image has the query's caption) on the first n samples."""
    img = F.normalize(embed_all(model, pixels[:n]), dim=-1)
    txt = F.normalize(model.encode_text(text_tokens[:n]).float(), dim=-1)
    best = (txt @ img.T).argmax(1)
    return float((caption_ids[:n][best] == caption_ids[:n]).float().mean())


# ------------------------------------------------------------------------------------------
# phase 2: unCLIP UNet

def encode_cached(taesd, images, cache: Path | None) -> torch.Tensor:
    """Raw TAESD encoder outputs of every image (minutes on a CPU: cached beside the checkpoints)."""
    from safetensors.torch import load_file
    if cache is not None and cache.is_file():
        return load_file(str(cache))["u"]
    u = tm.encode_all(taesd, images, 256)
    if cache is not None:
        tm.save_safetensors(cache, {"u": u.contiguous()})
    return u


def unclip_adm(aug, emb, levels, noise):
    """ADM input as comfy.model_base.unclip_adm builds it (weight 1): [augmented embedding, level embedding]."""
    z = aug.unscale(aug.q_sample(aug.scale(emb), levels, noise=noise))
    return torch.cat((z, aug.time_embed(levels)), 1)


def train_unet(base, cond_model, x0_all, emb_all, toks, empty, seed, steps, batch, ckpt, every, resume, curve,
               lr=UNET_LR, caption_drop=CAPTION_DROP, colour_drop=0.0, toks_no_colour=None):
    from tqdm import tqdm
    named = {f"unet.{k}": p for k, p in base.diffusion_model.named_parameters()}
    params = list(named.values())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema = tm.EmaWeights(named, log)
    start, prev = ema.resume(ckpt, "unet", opt, curve) if resume and ckpt else (0, 0.0)
    ms, aug = base.model_sampling, base.noise_augmentor
    n = x0_all.shape[0]
    t0 = time.time() - prev
    avg, done = None, start
    for step in tqdm(range(start, steps), desc="unet unclip", initial=start, total=steps, mininterval=10):
        g = tm.gen(seed, 12, step)
        idx = torch.randint(0, n, (batch,), generator=g)
        drop_txt = torch.rand(batch, generator=g) < caption_drop
        drop_img = torch.rand(batch, generator=g) < IMAGE_DROP
        tk = {k: v[idx] for k, v in toks.items()}
        if colour_drop > 0:  # drawn only then: a run without it keeps the draws of the shipped recipe
            drop_col = torch.rand(batch, generator=g) < colour_drop
            tk = {k: torch.where(drop_col[:, None], toks_no_colour[k][idx], v) for k, v in tk.items()}
        tk = {k: torch.where(drop_txt[:, None], empty[k][None], v) for k, v in tk.items()}
        t = torch.randint(0, len(ms.sigmas), (batch,), generator=g)
        sigma = ms.sigmas[t].float()
        x0 = x0_all[idx]
        eps = torch.randn(x0.shape, generator=g)
        levels = torch.randint(0, MAX_AUG_LEVEL, (batch,), generator=g)
        e = emb_all[idx]
        adm = unclip_adm(aug, e, levels, torch.randn(e.shape, generator=g))
        adm = torch.where(drop_img[:, None], torch.zeros_like(adm), adm)
        with torch.no_grad():
            context, _ = tm.encode_text(cond_model, BASE_FAMILY, tk)
        xt = x0 + eps * sigma.view(-1, 1, 1, 1)
        tm.set_lr(opt, lr, step, steps, min(200, steps // 10 + 1), "const", max(0, steps // 5))
        out = base.diffusion_model(ms.calculate_input(sigma, xt), ms.timestep(sigma).float(),
                                   context=context.float(), y=adm)
        loss = F.mse_loss(out.float(), eps)
        ema.step(opt, loss, step)
        avg = loss.item() if avg is None else 0.99 * avg + 0.01 * loss.item()
        done = step + 1
        if done % 50 == 0:
            curve.append([done, round(avg, 5)])
            log.info("unet step %d loss %.4f", done, avg)
        if ema.checkpoint(ckpt, "unet", done, every, steps, opt, curve, t0):
            break
    ema.ship()
    return {"loss": avg if avg is not None else (curve[-1][1] if curve else None), "steps": done,
            "seconds": time.time() - t0}


# ------------------------------------------------------------------------------------------
# the whole run

def caption_tokens(clip, texts) -> dict[str, torch.Tensor]:
    """Token ids {"l": (N, 77) long} of ``texts``, as train_mini.load_data tokenises captions."""
    memo: dict[str, dict] = {}
    for t in texts:
        if t not in memo:
            memo[t] = {k: [i for i, _w in sec[0]] for k, sec in clip.tokenize(t).items()}
    per = [memo[t] for t in texts]
    return {k: torch.tensor([p[k] for p in per], dtype=torch.long) for k in per[0]}


def read_init(fmt, path: Path) -> tuple[dict, dict]:
    """(parts, metadata) of a Mini kNN file to fine-tune from."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
        flat = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("family") != FAMILY:
        raise SystemExit(f"--init {path}: not an Atelier Mini kNN file (family {meta.get('family')!r})")
    return fmt.unpack(flat, required=("unet", "open_clip")), meta


def train(seed=0, clip_steps=1500, clip_batch=256, unet_steps=3000, batch=32, data=8000, out=None,
          ckpt_dir=None, resume=False, every=250, base_path=None, init=None, lr=UNET_LR, caption_drop=CAPTION_DROP,
          colour_drop=0.0) -> dict:
    pkg, tiny, world, fmt, knn_embed = modules()
    base_path = Path(base_path or ROOT / "weights" / f"atelier_mini_{BASE_FAMILY}.safetensors")
    ckpt = tm.Checkpoint(Path(ckpt_dir)) if ckpt_dir else None
    torch.manual_seed(seed)
    t0 = time.time()
    clip, taesd = load_base(tiny, fmt, base_path)
    images, captions, toks, empty = tm.load_data(world, clip, BASE_FAMILY, seed, data, PX,
                                                 ckpt.folder if ckpt else None)
    uniq = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    caption_ids = torch.tensor([uniq[c] for c in captions])
    log.info("data: %d images, %d distinct captions (%.0f s)", len(images), len(uniq), time.time() - t0)

    init_parts, init_meta = read_init(fmt, Path(init)) if init else (None, {})
    cfg = json.loads(init_meta["open_clip_config"]) if init else open_clip_config(tiny)
    oc = knn_embed.random_open_clip(cfg, seed + 5)
    tokenizer = knn_embed._make_tokenizer(cfg)
    text_tokens = tokenizer(list(captions))
    pixels = clip_inputs(knn_embed, images)
    clip_curve: list = json.loads(init_meta["curve"])["open_clip"] if init else []
    if init:  # the open_clip as shipped: its embeddings (and the indexes built with them) do not change
        oc.load_state_dict(init_parts["open_clip"], strict=True)
        oc.eval().requires_grad_(False)
        loss = json.loads(init_meta["loss"])["open_clip"]
        rc = {"loss": loss, "seconds": float(init_meta["train_seconds"])}  # train_seconds: the first run's + this
        clip_steps, clip_batch = int(init_meta["clip_steps"]), int(init_meta["clip_batch"])
        scale = float(init_meta["embedding_scale"])
    else:
        rc = train_clip(oc, pixels, text_tokens, caption_ids, seed, clip_steps, clip_batch, ckpt, every, resume,
                        clip_curve)
        scale = unit_rms(oc, pixels)
    acc = retrieval_accuracy(oc, pixels, text_tokens, caption_ids)
    log.info("open_clip done: loss %s, embedding scale %.4f, text->image top-1 %.3f", rc["loss"], scale, acc)

    u = encode_cached(taesd, images, ckpt.folder / f"latents_px{PX}_seed{seed}_n{data}.safetensors" if ckpt else None)
    patcher = tiny.build_unclip_model(seed)
    base = patcher.model
    with torch.no_grad():
        if init:
            base.diffusion_model.load_state_dict(init_parts["unet"], strict=True)
        else:
            for name, p in base.diffusion_model.named_parameters():
                if any(z in name for z in tm.ZERO_INIT):
                    p.zero_()
    x0_all = ((u / taesd.vae_scale + taesd.vae_shift) * base.latent_format.scale_factor).float()
    emb_all = embed_all(oc, pixels)
    log.info("latents std %.3f, embeddings rms %.3f", x0_all.std().item(), emb_all.pow(2).mean().sqrt().item())
    unet_curve: list = []
    toks_no_colour = caption_tokens(clip, [world.without_colours(c) for c in captions]) if colour_drop > 0 else None
    ru = train_unet(base, clip.cond_stage_model, x0_all, emb_all, toks, empty, seed, unet_steps, batch, ckpt, every,
                    resume, unet_curve, lr, caption_drop, colour_drop, toks_no_colour)
    summary = {
        "family": FAMILY, "seed": seed, "steps": ru["steps"], "clip_steps": clip_steps, "clip_batch": clip_batch,
        "batch": batch, "data": data, "px": PX, "lr": lr, "clip_lr": CLIP_LR,
        "caption_drop": caption_drop, "colour_drop": colour_drop, "image_drop": IMAGE_DROP,
        "unet_seconds": round(ru["seconds"], 1),
        "fine_tuned_from": (f"{Path(init).name} sha256 {file_sha256(Path(init))[:16]}, trained {init_meta['steps']} "
                            f"UNet steps at lr {init_meta['lr']}, caption drop "
                            f"{init_meta.get('caption_drop', CAPTION_DROP)}") if init else "",
        "train_seconds": round(rc["seconds"] + ru["seconds"], 1), "hardware": tm.hardware(),
        "final_clip_loss": rc["loss"], "final_unet_loss": ru["loss"], "embedding_scale": scale,
        "text_image_top1": acc, "clip_curve": clip_curve, "unet_curve": unet_curve,
        "base": base_path.name, "base_sha256": file_sha256(base_path),
    }
    if out:
        write_weights(out, fmt, world, base, oc, cfg, tokenizer, text_tokens, summary)
    return summary


def write_weights(path, fmt, world, base, oc, cfg, tokenizer, text_tokens, summary):
    ids = torch.cat([tokenizer(list(world.VOCABULARY)).flatten(), text_tokens.flatten()]).unique()
    flat = fmt.pack({"unet": base.diffusion_model.state_dict(), "open_clip": oc.state_dict()}, token_ids=ids,
                    embedding_keys=(f"open_clip.{OPEN_CLIP_TOKEN_KEY}",))
    meta = {k: str(summary[k]) for k in ("family", "seed", "steps", "clip_steps", "clip_batch", "batch", "data",
                                         "px", "lr", "clip_lr", "train_seconds", "hardware", "embedding_scale",
                                         "text_image_top1", "base", "base_sha256", "caption_drop", "colour_drop",
                                         "image_drop", "unet_seconds")}
    if summary.get("fine_tuned_from"):
        meta["fine_tuned_from"] = summary["fine_tuned_from"]
    meta.update({"format": fmt.FORMAT, "vocabulary": json.dumps(list(world.VOCABULARY)),
                 "open_clip_config": json.dumps(cfg),
                 "loss": json.dumps({"open_clip": summary["final_clip_loss"], "unet": summary["final_unet_loss"]}),
                 "curve": json.dumps({"open_clip": summary["clip_curve"][-40:], "unet": summary["unet_curve"][-200:]}),
                 "storage": "int8 per-output-channel weights (rank>=2, >=4096 elements), fp16 rest; "
                            "open_clip token embedding: the world vocabulary's rows only",
                 "recipe": "tools/train_mini_knn.py",
                 "train_seconds_note": "open_clip + UNet phase wall time on a shared 2-core machine"})
    path = Path(path)
    tm.save_safetensors(path, flat, meta)
    log.info("wrote %s (%.2f MB)", path, path.stat().st_size / 1e6)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clip-steps", type=int, default=1500)
    ap.add_argument("--clip-batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3000, help="unCLIP UNet steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--data", type=int, default=8000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--out", default=None, help="default weights/atelier_mini_knn.safetensors")
    ap.add_argument("--ckpt-dir", default=None, help="default out/mini_ckpt/knn_seed<seed>")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--init", default=None, help="fine-tune the UNet of this Mini kNN file (its open_clip is kept)")
    ap.add_argument("--lr", type=float, default=UNET_LR, help="UNet learning rate")
    ap.add_argument("--caption-drop", type=float, default=CAPTION_DROP, help="share of empty captions")
    ap.add_argument("--colour-drop", type=float, default=0.0,
                    help="share of captions with their colour words removed (the colours left to the image embedding)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    out = args.out or ROOT / "weights" / "atelier_mini_knn.safetensors"
    ckpt_dir = args.ckpt_dir or ROOT / "out" / "mini_ckpt" / f"knn_seed{args.seed}{'_ft' if args.init else ''}"
    s = train(args.seed, args.clip_steps, args.clip_batch, args.steps, args.batch, args.data, out, ckpt_dir,
              args.resume, args.every, init=args.init, lr=args.lr, caption_drop=args.caption_drop,
              colour_drop=args.colour_drop)
    print(json.dumps({k: v for k, v in s.items() if not k.endswith("curve")}, indent=1))


if __name__ == "__main__":
    main()
