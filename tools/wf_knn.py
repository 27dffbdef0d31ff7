"""Example workflows for the kNN retriever (KNN-Diffusion on SD2.1 unCLIP; neighbours -> Flux Redux).

The databases are folders of generated-world images written by Atelier World Image Folder, so every workflow
runs on a fresh install; point Build Index at your own folder instead. With --tiny (or ATELIER_TINY_MODELS=1)
the unCLIP checkpoint and the open_clip model are replaced by tiny seeded stand-ins and index names get a
'_tiny' suffix.
"""

UNCLIP = "sd21-unclip-h.ckpt"
OPEN_CLIP = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
OPEN_CLIP_ARCH = "ViT-H-14"
PROMPT = "a red circle left of a blue square"

WARM = dict(folder="atelier_world/warm_shapes", colors="red, orange, yellow", title="Warm shapes (database A)")
COOL = dict(folder="atelier_world/cool_shapes", colors="blue, cyan, purple", title="Cool shapes (database B)")


def _world(g, spec, count=48):
    return g.node("AtelierWorldFolder", title=spec["title"], folder=spec["folder"], colors=spec["colors"],
                  shapes="", count=count, size=256, seed=0)


def _embedder(g):
    return g.node("AtelierKNNOpenCLIPLoader", title="open_clip ViT-H/14",
                  clip_name=OPEN_CLIP, architecture=OPEN_CLIP_ARCH)


def _build(g, emb, folder_out, name, backend="faiss"):
    where = "" if backend == "faiss" else " (Milvus)"
    return g.node("AtelierKNNBuildIndex", title=f"Build index '{name}'{where}", embedder=emb[0], folder=folder_out[0],
                  index_name=name, index_type="auto", rebuild=False, batch_size=16, backend=backend, milvus_uri="")


def _retrieve(g, index, emb, text, title="Retrieve by text"):
    return g.node("AtelierKNNRetrieve", title=title, index=index[0], embedder=emb[0], text=text, k=4,
                  combine="weighted mean", temperature=0.05, image_size=256)


def _latent(g):
    return g.node("EmptyLatentImage", width=768, height=768, batch_size=1)


def _generate(g, ck, pos, neg, hits, prefix, title="KSampler", lat=None):
    cond = g.node("AtelierKNNConditioning", conditioning=pos[0], neighbours=hits[2], strength=1.0, temperature=0.05,
                  query_weight=0.0, mode="weighted mean", noise_augmentation=0.1, model=ck[0])
    lat = lat or _latent(g)
    ks = g.node("KSampler", title=title, model=ck[0], positive=cond[0], negative=neg[0], latent_image=lat[0],
                seed=42, steps=8, cfg=7.0, sampler_name="euler", scheduler="normal", denoise=1.0)
    img = g.node("VAEDecode", samples=ks[0], vae=ck[2])
    g.node("SaveImage", title=f"{title}: result", images=img[0], filename_prefix=prefix)


def _unclip(g, prompt):
    ck = g.node("unCLIPCheckpointLoader", title="SD2.1 unCLIP-h", ckpt_name=UNCLIP)
    pos = g.node("CLIPTextEncode", title="Positive", text=prompt, clip=ck[1])
    neg = g.node("CLIPTextEncode", title="Negative", text="blurry, low quality", clip=ck[1])
    return ck, pos, neg


def knn_build_index(g):
    g.note("Build a kNN index (a database) of an image folder. Atelier World Image Folder writes 48 generated "
           "images of warm-coloured shapes under ComfyUI's input folder; replace it by typing your own folder "
           "(relative to input/) into Build Index's folder. The index goes to models/atelier/knn_index/<name>; "
           "running again embeds only new or changed images. The embedder is an open_clip ViT-H/14 file in "
           "models/atelier/open_clip. Retrieve shows the 4 images nearest to a text query.")
    world = _world(g, WARM)
    emb = _embedder(g)
    index = _build(g, emb, world, "demo_warm_shapes")
    hits = _retrieve(g, index, emb, "a red circle")
    g.node("SaveImage", title="Neighbours", images=hits[0], filename_prefix="atelier_knn_neighbours")


def knn_text_to_unclip(g):
    g.note("KNN-Diffusion on SD2.1 unCLIP-h: the prompt retrieves its 4 nearest images from the database in "
           "open_clip ViT-H/14 space, and their score-weighted image embedding conditions the unCLIP model next to "
           "the text (unclip_conditioning, which the model was trained to read). The ViT-H/14 text and image towers "
           "share the space unCLIP-h's image input lives in. noise_augmentation loosens how closely the result "
           "follows the neighbours; strength 0 is plain text-to-image. Retrieve's clip_vision_output also feeds core "
           "unCLIP Conditioning, Apply Style Model or IPAdapter.")
    ck, pos, neg = _unclip(g, PROMPT)
    world = _world(g, WARM)
    emb = _embedder(g)
    index = _build(g, emb, world, "demo_warm_shapes")
    hits = _retrieve(g, index, emb, PROMPT)
    _generate(g, ck, pos, neg, hits, "atelier_knn_unclip")


def knn_two_databases(g):
    g.note("The same prompt, seed and model on two databases: warm-coloured shapes (A) and cool-coloured shapes "
           "(B). Only the retrieved neighbours differ, and so does the picture. Database A is a local faiss index; "
           "database B lives in Milvus (backend milvus: with milvus_uri empty, the embedded Milvus Lite file "
           "models/atelier/knn_index/atelier_milvus.db; type http://host:19530 for a Milvus server, with the token in "
           "ATELIER_MILVUS_TOKEN, never in the workflow). With your own images, build one index per folder and pick "
           "it in Atelier kNN Load Index instead of building here.")
    ck, pos, neg = _unclip(g, PROMPT)
    emb = _embedder(g)
    lat = _latent(g)  # one latent for both: the same start, only the neighbours differ
    for spec, name, tag, backend in ((WARM, "demo_warm_shapes", "A", "faiss"), (COOL, "demo_cool_shapes", "B", "milvus")):
        world = _world(g, spec)
        index = _build(g, emb, world, name, backend)
        hits = _retrieve(g, index, emb, PROMPT, title=f"Retrieve from database {tag}")
        _generate(g, ck, pos, neg, hits, f"atelier_knn_database_{tag.lower()}", title=f"Database {tag}", lat=lat)


FLUX_DEV = "flux1-dev.safetensors"
FLUX_TEXT = ("clip_l.safetensors", "t5xxl_fp16.safetensors")
FLUX_VAE = "ae.safetensors"
SIGLIP = "sigclip_vision_patch14_384.safetensors"
REDUX = "flux1-redux-dev.safetensors"


def knn_flux_redux(g):
    g.note("kNN neighbours -> Flux Redux: the prompt retrieves its 4 nearest images from the database in open_clip "
           "space (text queries need open_clip's text tower); Retrieve re-encodes those images with Redux's SigLIP "
           f"image encoder ({SIGLIP} in models/clip_vision/) and core Apply Style Model turns their score-weighted "
           f"token states into Flux text tokens through {REDUX} (models/style_models/). Retrieve's style_model "
           "input checks that the CLIP vision model makes the hidden states Redux reads (SigLIP, 1152 wide) before "
           "any work. combine 'all neighbours' appends 729 tokens per neighbour instead of one weighted set. "
           f"Flux.1 dev: {FLUX_DEV} (models/diffusion_models/), {FLUX_TEXT[0]} + {FLUX_TEXT[1]}, {FLUX_VAE}. With "
           "--tiny every loader becomes its tiny seeded stand-in (tiny flux, SigLIP, Redux, open_clip).")
    model = g.node("UNETLoader", title="Load Diffusion Model", unet_name=FLUX_DEV, weight_dtype="default")
    clip = g.node("DualCLIPLoader", title="Text encoders (CLIP-L + T5-XXL)", clip_name1=FLUX_TEXT[0],
                  clip_name2=FLUX_TEXT[1], type="flux")
    vae = g.node("VAELoader", title="Flux VAE", vae_name=FLUX_VAE)
    vision = g.node("CLIPVisionLoader", title="SigLIP (Redux's image encoder)", clip_name=SIGLIP)
    style = g.node("StyleModelLoader", title="Flux Redux", style_model_name=REDUX)
    world = _world(g, WARM)
    emb = _embedder(g)
    index = _build(g, emb, world, "demo_warm_shapes")
    hits = g.node("AtelierKNNRetrieve", title="Retrieve by text", index=index[0], embedder=emb[0], text=PROMPT, k=4,
                  combine="weighted mean", temperature=0.05, image_size=384, clip_vision=vision[0],
                  allow_other_model=False, style_model=style[0])
    pos = g.node("CLIPTextEncode", title="Prompt", text=PROMPT, clip=clip[0])
    neg = g.node("CLIPTextEncode", title="Negative (unused at cfg 1)", text="", clip=clip[0])
    styled = g.node("StyleModelApply", conditioning=pos[0], style_model=style[0], clip_vision_output=hits[1],
                    strength=1.0, strength_type="multiply")
    guided = g.node("FluxGuidance", conditioning=styled[0], guidance=3.5)
    latent = g.node("EmptySD3LatentImage", width=1024, height=1024, batch_size=1)
    ks = g.node("KSampler", model=model[0], positive=guided[0], negative=neg[0], latent_image=latent[0],
                seed=42, steps=20, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
    img = g.node("VAEDecode", samples=ks[0], vae=vae[0])
    g.node("SaveImage", images=img[0], filename_prefix="atelier_knn_flux_redux")
    g.node("SaveImage", title="Neighbours", images=hits[0], filename_prefix="atelier_knn_redux_neighbours")


WORKFLOWS = {
    "knn_build_index.json": knn_build_index,
    "knn_text_to_unclip.json": knn_text_to_unclip,
    "knn_two_databases.json": knn_two_databases,
    "knn_flux_redux.json": knn_flux_redux,
}
