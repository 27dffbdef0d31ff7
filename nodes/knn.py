"""kNN retriever nodes (KNN-Diffusion): build a CLIP index of an image folder, retrieve neighbours by text
or image, and turn them into conditioning. Thin glue over ../models/knn.py.

Folders (registered at import, extendable in extra_model_paths.yaml):
  atelier_knn_index   models/atelier/knn_index/<name>/      one folder per index (database)
  atelier_open_clip   models/atelier/open_clip/*.safetensors open_clip checkpoints (both towers)
  atelier_knn_images  (none by default)                      image folders that may be indexed besides
                                                             ComfyUI's input folder

Conditioning path: the neighbours' image embeddings go into ``unclip_conditioning``, the input through which
ComfyUI feeds a CLIP *image* embedding to the models trained to take one (SD2.1 unCLIP; SDXL "revision",
which reads it as the pooled vector). That is what KNN-Diffusion conditions on: image embeddings of the
query's neighbours, no retraining. Token-level paths (style models such as Flux Redux, IPAdapter) need the
neighbours' hidden states: the Retrieve node re-encodes the neighbour images with a CLIP_VISION model for
its CLIP_VISION_OUTPUT, which the core and IPAdapter nodes take as is.

Flux Redux (issue 18.4): Redux reads its SigLIP's last hidden states (729 x 1152 per image). The index keeps pooled
embeddings only (1.7 MB of fp16 token states per image would be 168 GB for 100k images) and Retrieve re-encodes
the k neighbours at query time (k SigLIP forwards, small against a Flux step). The index's embedder only finds
the neighbours (open_clip for text queries, or the SigLIP itself: ``clip_vision_embedder`` pools it as the mean of
its tokens); what Redux reads comes from the re-encoding CLIP vision model, so that is what ``check_style_space``
checks against the style model (kind: SigLIP / CLIP, and width), when Retrieve's optional style_model is connected.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
from pathlib import Path

import comfy.clip_vision
import comfy.model_management
import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy_api.latest import io, ui

from ..models import knn, knn_embed, knn_milvus, knn_world, world
from . import glue

log = logging.getLogger(__name__)

CATEGORY = "atelier/retrieval"
FOLDER_INDEX = "atelier_knn_index"
FOLDER_OPEN_CLIP = "atelier_open_clip"
FOLDER_IMAGES = "atelier_knn_images"
FROM_FILE = "from file"

Embedder = io.Custom("ATELIER_KNN_EMBEDDER")
Index = io.Custom("ATELIER_KNN_INDEX")
Neighbours = io.Custom("ATELIER_KNN_NEIGHBOURS")


for _name, _sub, _exts in ((FOLDER_INDEX, ("atelier", "knn_index"), {".json"}),
                            (FOLDER_OPEN_CLIP, ("atelier", "open_clip"), {".safetensors"}),
                            (FOLDER_IMAGES, None, set())):
    glue.register_model_folder(_name, _sub, _exts)


# ----------------------------------------------------------------------------- paths

def resolve_image_folder(text: str, must_exist: bool = True) -> Path:
    """The real path of a folder of images typed into a widget: relative to ComfyUI's input folder, or absolute
    inside it or inside a folder listed under ``atelier_knn_images:`` in extra_model_paths.yaml. Symlinks are
    resolved and their target must lie inside those folders too: a link in the input folder pointing elsewhere
    is refused (list the real folder under atelier_knn_images instead), as are '..' and other paths."""
    return glue.resolve_user_folder(text, "folder", extra_folders=(FOLDER_IMAGES,), must_exist=must_exist,
                                    example="moodboard")


def resolve_world_folder(text: str) -> Path:
    """The real path of the folder Atelier World Image Folder fills: inside ComfyUI's input folder only (a
    symlink leading out of it is refused); it need not exist yet."""
    return glue.resolve_user_folder(text, "folder", must_exist=False, example="atelier_world/warm_shapes")


def index_names() -> list[str]:
    names = set()
    for base in folder_paths.get_folder_paths(FOLDER_INDEX):
        if os.path.isdir(base):
            names.update(d for d in os.listdir(base) if os.path.isfile(os.path.join(base, d, "atelier_knn.json")))
    return sorted(names)


def index_dir(name: str, create: bool = False) -> Path:
    name = knn.check_index_name(name)
    bases = folder_paths.get_folder_paths(FOLDER_INDEX)
    for base in bases:
        if os.path.isfile(os.path.join(base, name, "atelier_knn.json")):
            return knn.safe_join(base, name)
    if create:
        return knn.safe_join(bases[0], name)
    raise knn.KNNError(f"database: No index named {name!r} in {', '.join(bases)}; build it with 'Atelier kNN "
                       "Build Index' and refresh the page (R)", "database")


BACKENDS = ("faiss", "milvus")
MILVUS_LITE_FILE = "atelier_milvus.db"
MILVUS_URI_ENV = "ATELIER_MILVUS_URI"
FOLDER_MILVUS_TOKEN = "atelier_knn_milvus_token"  # extra_model_paths.yaml: a file holding the token (never the token)
BACKEND_TOOLTIP = ("faiss: a local index folder under models/atelier/knn_index (default). milvus: a collection in "
                   "a Milvus database, embedded (Milvus Lite file) or a server/cluster for libraries that outgrow one "
                   "machine.")
URI_TOOLTIP = ("Milvus only. Empty: $ATELIER_MILVUS_URI, else the embedded Milvus Lite file "
               "models/atelier/knn_index/atelier_milvus.db. A server: http://host:19530. Credentials never go "
               "here: set ATELIER_MILVUS_TOKEN (user:password or API key), or name a token file under "
               "atelier_knn_milvus_token in extra_model_paths.yaml.")


def milvus_token() -> str:
    """The Milvus token: $ATELIER_MILVUS_TOKEN, else the first readable file listed under atelier_knn_milvus_token in
    extra_model_paths.yaml. Never logged, never a node input (so never in a workflow)."""
    tok = os.environ.get(knn_milvus.TOKEN_ENV, "").strip()
    if tok:
        return tok
    for path in folder_paths.folder_names_and_paths.get(FOLDER_MILVUS_TOKEN, ([], set()))[0]:
        try:
            with open(path, encoding="utf-8") as f:
                tok = f.read().strip()
        except OSError:
            continue
        if tok:
            return tok
    return ""


def milvus_target(uri: str, collection: str, name_input: str) -> knn_milvus.MilvusTarget:
    """The Milvus collection a node's inputs name (the URI checked, the token from the environment)."""
    uri = (uri or "").strip() or os.environ.get(MILVUS_URI_ENV, "").strip()
    if not uri:
        uri = os.path.join(folder_paths.get_folder_paths(FOLDER_INDEX)[0], MILVUS_LITE_FILE)
    knn_milvus.check_uri(uri, "milvus_uri")
    return knn_milvus.MilvusTarget(uri, knn_milvus.check_collection_name(collection, name_input),
                                   token=milvus_token(), input_name="milvus_uri", name_input=name_input)


def database_target(backend: str, name: str, uri: str, name_input: str, create: bool = False):
    """What models/knn builds into or opens: an index folder (faiss) or a Milvus collection."""
    if backend not in BACKENDS:
        raise knn.KNNError(f"backend: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}", "backend")
    if backend == "milvus":
        return milvus_target(uri, name, name_input)
    return index_dir(name, create=create)


def _embedder_module(embedder) -> torch.nn.Module | None:
    """The torch module an embedder runs (open_clip model, ComfyUI CLIP vision model), if any."""
    for m in (getattr(embedder, "model", None), getattr(getattr(embedder, "clip_vision", None), "model", None)):
        if isinstance(m, torch.nn.Module):
            return m
    return None


@contextlib.contextmanager
def cancellable_embedder(embedder):
    """Cancel acts inside the embedding forward: before each transformer block (depth 4 reaches the blocks of
    open_clip's and ComfyUI's CLIP vision towers), not only between batches."""
    module = _embedder_module(embedder)
    if module is None:
        yield
        return
    with glue.interruptible(module, depth=4):
        yield


# ----------------------------------------------------------------------------- embedders

def _state_fingerprint(module: torch.nn.Module) -> str:
    """Identifies CLIP vision weights: every key and shape, plus the values of a few small tensors."""
    h = hashlib.sha256()
    sd = module.state_dict()
    for k in sorted(sd):
        h.update(f"{k}:{tuple(sd[k].shape)};".encode())
    for k in sorted(sd)[-8:]:
        h.update(sd[k].detach().float().cpu().contiguous().numpy().tobytes()[: 1 << 20])
    return h.hexdigest()[:16]


def vision_space(clip_vision) -> tuple[str, int]:
    """(kind, width) of the hidden states a ComfyUI CLIP vision model gives: kind 'siglip' (no class token, every
    token post-layernormed, as Flux Redux reads), 'clip' (CLIP ViT: class token first) or 'dinov2'."""
    vm = getattr(clip_vision.model, "vision_model", None)
    if vm is None:
        return "dinov2", int(getattr(getattr(clip_vision.model, "config", None), "hidden_size", 0) or 0)
    kind = "siglip" if getattr(vm.embeddings, "class_embedding", None) is None else "clip"
    return kind, int(vm.post_layernorm.normalized_shape[0])


def style_model_space(style_model) -> tuple[str, int, str] | None:
    """(kind, width, label) of the CLIP vision hidden states a STYLE_MODEL reads (core StyleModel.get_cond passes
    last_hidden_state): Flux Redux reads SigLIP states of its redux_dim, the SD1.5 T2I style adapter CLIP ViT-L
    states of its width; None for a style model Atelier does not know."""
    inner = getattr(style_model, "model", None)
    up = getattr(inner, "redux_up", None)
    if up is not None:
        return "siglip", int(up.in_features), "Flux Redux"
    emb = getattr(inner, "style_embedding", None)
    if isinstance(emb, torch.Tensor):
        return "clip", int(emb.shape[-1]), "the T2I style adapter"
    return None


VISION_FILES = {"siglip": "sigclip_vision_patch14_384.safetensors", "clip": "a CLIP ViT-L/14 vision model"}


def check_style_space(style_model, clip_vision, input_name: str) -> None:
    """Refuse, naming ``input_name``, a CLIP vision model whose hidden states are not in the space ``style_model``
    reads (another kind of vision model, or another width). Width and kind are what the weights tell: two SigLIPs
    of the same width are not told apart."""
    reads = style_model_space(style_model)
    if reads is None:
        log.warning("Atelier kNN Retrieve: %s is a style model Atelier does not know; its input space is not "
                    "checked.", type(getattr(style_model, "model", style_model)).__name__)
        return
    kind, width, label = reads
    if clip_vision is None:
        raise glue.fail(input_name, f"{label} reads the hidden states of a {kind} vision model ({width} wide), and "
                        "this embedder has none (an open_clip embedder makes pooled embeddings only)",
                        f"connect the CLIP vision model {label} was trained with to Retrieve's clip_vision input "
                        f"(Load CLIP Vision: {VISION_FILES[kind]}); it re-encodes the neighbour images",
                        cls=knn.KNNError)
    got_kind, got_width = vision_space(clip_vision)
    if (got_kind, got_width) != (kind, width):
        raise glue.fail(input_name, f"this CLIP vision model makes {got_width}-wide {got_kind} hidden states, but "
                        f"{label} reads {width}-wide {kind} ones: its image tokens would be meaningless (or a "
                        "shape error inside Apply Style Model)",
                        f"connect the CLIP vision model {label} was trained with (Load CLIP Vision: "
                        f"{VISION_FILES[kind]})", cls=knn.KNNError)


def _siglip_pooled(clip_vision, batch: torch.Tensor) -> torch.Tensor:
    """A SigLIP image embedding: the mean of its post-layernorm tokens (ComfyUI loads no attention-pooling head)."""
    return clip_vision.encode_image(batch, crop=True).last_hidden_state.mean(dim=1)


def clip_vision_embedder(clip_vision) -> knn.CallableEmbedder:
    """Wrap ComfyUI's ClipVisionModel: image embeddings only (it has no text tower). CLIP: its projected image
    embedding; SigLIP (Flux Redux's image encoder): the mean of its last hidden states, as wide as them."""
    model = clip_vision.model
    if getattr(model, "vision_model", None) is not None and vision_space(clip_vision)[0] == "siglip":
        width = vision_space(clip_vision)[1]
        emb = knn.CallableEmbedder(f"comfy_siglip_vision:{_state_fingerprint(model)}", width, clip_vision.image_size,
                                   lambda batch: _siglip_pooled(clip_vision, batch), kind="comfy_siglip_vision")
        emb.clip_vision = clip_vision
        return emb
    proj = getattr(model, "visual_projection", None)
    dim = getattr(proj, "out_features", None)
    if dim is None:
        raise knn.KNNError("This CLIP vision model has no projection head (e.g. DINOv2), so it makes no CLIP image "
                           "embedding; use a CLIP ViT-L/H/G vision model.")

    def image_fn(batch: torch.Tensor) -> torch.Tensor:
        return clip_vision.encode_image(batch, crop=True).image_embeds

    emb = knn.CallableEmbedder(f"comfy_clip_vision:{_state_fingerprint(model)}", dim, clip_vision.image_size,
                               image_fn, kind="comfy_clip_vision")
    emb.clip_vision = clip_vision
    return emb


class AtelierKNNOpenCLIPLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import open_clip
        return io.Schema(
            node_id="AtelierKNNOpenCLIPLoader",
            display_name="Atelier kNN open_clip Loader",
            category=CATEGORY,
            description="Loads an open_clip CLIP model (image and text towers) from models/atelier/open_clip "
                        "(.safetensors only) as the embedding model of a kNN index. Text queries need it.",
            inputs=[
                io.Combo.Input("clip_name", options=folder_paths.get_filename_list(FOLDER_OPEN_CLIP),
                               tooltip="An open_clip checkpoint in models/atelier/open_clip, e.g. "
                                       "open_clip_model.safetensors from an open_clip Hugging Face repo."),
                io.Combo.Input("architecture", options=[FROM_FILE] + open_clip.list_models(), default=FROM_FILE,
                               tooltip="The open_clip architecture of the file (e.g. ViT-H-14). 'from file' reads it "
                                       "from the file's metadata or from a <name>.json / open_clip_config.json "
                                       "next to it."),
            ],
            outputs=[Embedder.Output("embedder", display_name="embedder",
                                     tooltip="Embedding model for the kNN nodes.")],
        )

    @classmethod
    def execute(cls, clip_name: str, architecture: str) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(FOLDER_OPEN_CLIP, clip_name)
        arch = None if architecture == FROM_FILE else architecture
        knn_embed.check_safetensors(path, "clip_name")  # pickle: refused with the one-line conversion
        tensors, metadata = glue.load_safetensors(path, "clip_name", "open_clip safetensors", knn_embed.OPEN_CLIP_FIX)
        return io.NodeOutput(knn.load_open_clip(path, arch=arch, device=comfy.model_management.text_encoder_device(),
                                                input_name="clip_name", tensors=tensors, metadata=metadata))


class AtelierKNNCLIPVisionEmbedder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierKNNCLIPVisionEmbedder",
            display_name="Atelier kNN Embedder from CLIP Vision",
            category=CATEGORY,
            description="Uses a ComfyUI CLIP Vision model (Load CLIP Vision) as the embedding model of a kNN "
                        "index: its image embeddings are exactly what unCLIP, style models and IPAdapter read. "
                        "It has no text tower, so such an index is queried by image.",
            inputs=[io.ClipVision.Input("clip_vision", tooltip="From Load CLIP Vision, e.g. clip_vision_h.safetensors "
                                                               "for SD2.1 unCLIP-h, clip_vision_g for SDXL revision.")],
            outputs=[Embedder.Output("embedder", display_name="embedder",
                                     tooltip="Embedding model for the kNN nodes (image queries only).")],
        )

    @classmethod
    def execute(cls, clip_vision) -> io.NodeOutput:
        return io.NodeOutput(clip_vision_embedder(clip_vision))


# ----------------------------------------------------------------------------- demo databases

class AtelierWorldFolder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierWorldFolder",
            display_name="Atelier World Image Folder",
            category=CATEGORY,
            description="Writes a folder of generated-world images (coloured shapes, with a caption .txt next to "
                        "each) under ComfyUI's input folder, filtered by colour and shape: a database to index "
                        "when you have no images at hand, or a reproducible test set. Same inputs, same files; "
                        "running it again writes nothing new.",
            inputs=[
                io.String.Input("folder", default="atelier_world/warm_shapes",
                                tooltip="Folder to fill, relative to ComfyUI's input folder (a symlink leading out "
                                        "of it is refused). Only files this node wrote there (recorded in "
                                        ".atelier_written.json) and unchanged since are ever replaced or removed; "
                                        "other files, even named like its own, are left alone."),
                io.String.Input("colors", default="red, orange, yellow",
                                tooltip="Comma-separated colours objects may have: " + ", ".join(world.COLORS)
                                        + ". Empty: all."),
                io.String.Input("shapes", default="",
                                tooltip="Comma-separated shapes: " + ", ".join(world.SHAPES) + ". Empty: all."),
                io.Int.Input("count", default=48, min=1, max=knn_world.MAX_COUNT, tooltip="Number of images."),
                io.Int.Input("size", default=128, min=32, max=1024, step=8, tooltip="Side of the images in pixels."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of the generated world."),
            ],
            outputs=[
                io.String.Output("image_folder", display_name="folder",
                                 tooltip="The folder (as typed), for Atelier kNN Build Index."),
                io.Image.Output("preview", display_name="preview", tooltip="The first 16 images."),
                io.String.Output("captions", display_name="captions", tooltip="One caption per image, one per line."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, folder: str = "", **kwargs):
        try:  # run again when files were deleted or changed by hand
            return (folder, tuple(sorted(kwargs.items())),
                    hashlib.sha256(repr(knn.scan_folder(resolve_world_folder(folder))).encode()).hexdigest())
        except (OSError, glue.AtelierError):
            return float("nan")

    @classmethod
    def execute(cls, folder: str, colors: str, shapes: str, count: int, size: int, seed: int) -> io.NodeOutput:
        dst = resolve_world_folder(folder)
        dst.mkdir(parents=True, exist_ok=True)
        pbar = comfy.utils.ProgressBar(count)

        def cancel() -> bool:
            glue.check_interrupt()  # raises on Cancel (checked before every image)
            return False

        paths, captions, written = knn_world.write_world_folder(
            dst, seed=seed, count=count, size=size, colors=colors, shapes=shapes,
            progress=lambda done, total: pbar.update_absolute(done, total), cancel=cancel,
            written=glue.WrittenFiles(dst))
        log.info("Atelier World Image Folder: %d images in %s (%d written now)", len(paths), dst, written)
        preview = torch.stack([torch.from_numpy(np.asarray(glue.open_image(p, "folder"), dtype=np.float32) / 255.0)
                               for p in paths[:16]])
        return io.NodeOutput(folder, preview, "\n".join(captions))


# ----------------------------------------------------------------------------- build / load

class AtelierKNNBuildIndex(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierKNNBuildIndex",
            display_name="Atelier kNN Build Index",
            category=CATEGORY,
            description="Embeds every image of a folder (recursively) into a kNN index under "
                        "models/atelier/knn_index/<index_name>. Incremental: unchanged images are not embedded "
                        "again, removed ones are dropped. Cancel keeps the work done; running it again resumes. "
                        "Unreadable images are skipped and listed in the report.",
            inputs=[
                Embedder.Input("embedder", tooltip="The embedding model; query the index with the same one."),
                io.String.Input("folder", default="", tooltip="Folder of images, relative to ComfyUI's input folder "
                                "(or absolute, inside it or inside a folder listed under atelier_knn_images in "
                                "extra_model_paths.yaml)."),
                io.String.Input("index_name", default="my_images", tooltip="Name of the index (database): letters, "
                                "digits, spaces, '_', '-', '.'. It appears in the Load Index list."),
                io.Combo.Input("index_type", options=list(knn.knn_index.KINDS), default="auto",
                               tooltip="auto: exact search below 100k images, IVF above, IVF-PQ above 5M. "
                                       "hnsw: fastest queries, slow to build."),
                io.Boolean.Input("rebuild", default=False, tooltip="Replaces the index: embeds every image again "
                                 "and, once that is complete, puts the new index in place of the old one (which "
                                 "stays usable until then, and after a cancel). Needed to give an existing "
                                 "index_name another folder or embedding model; without it such a build is "
                                 "refused and the index left untouched."),
                io.Int.Input("batch_size", default=16, min=1, max=512, tooltip="Images embedded per step; larger is "
                             "faster on a GPU and uses more memory."),
                io.Combo.Input("backend", options=list(BACKENDS), default="faiss", optional=True,
                               tooltip=BACKEND_TOOLTIP + " With milvus, index_name is the collection name (letters, "
                                       "digits, '_')."),
                io.String.Input("milvus_uri", default="", optional=True, tooltip=URI_TOOLTIP),
            ],
            outputs=[Index.Output("index", display_name="index", tooltip="The built index, ready for Retrieve."),
                     io.String.Output("report", display_name="report",
                                      tooltip="Counts, and the images that were skipped and why.")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, folder: str | None = None, index_name: str = "", index_type: str = "",
                           rebuild: bool = False, batch_size: int = 0, backend: str = "faiss", milvus_uri: str = "",
                           **_):
        """Run again when the folder's images or the index change (a stat scan, no reading). A Milvus collection
        can change behind the node's back (another machine), so it is checked on every run (the build is
        incremental: nothing to do costs a scan and one query)."""
        if folder is None or rebuild or backend == "milvus":  # linked folders are not known before the run
            return float("nan")
        try:
            files, skipped = knn.scan_folder(resolve_image_folder(folder))
            exists = (index_dir(index_name, create=True) / "atelier_knn.json").is_file()
        except (OSError, glue.AtelierError):
            return float("nan")
        return (folder, index_name, index_type, len(files), len(skipped), exists,
                hashlib.sha256(repr(files).encode()).hexdigest())

    @classmethod
    def execute(cls, embedder, folder: str, index_name: str, index_type: str, rebuild: bool,
                batch_size: int, backend: str = "faiss", milvus_uri: str = "") -> io.NodeOutput:
        src = resolve_image_folder(folder)
        dst = database_target(backend, index_name, milvus_uri, "index_name", create=True)
        pbar = None

        def progress(done: int, total: int) -> None:
            nonlocal pbar
            if pbar is None:
                pbar = comfy.utils.ProgressBar(total)
            pbar.update_absolute(done, total)

        def cancel() -> bool:
            glue.check_interrupt()  # raises on Cancel
            return False

        try:
            with cancellable_embedder(embedder):
                report = knn.build_index(src, dst, embedder, kind=index_type, batch_size=batch_size,
                                         progress=progress, cancel=cancel, rebuild=rebuild)
        except knn.IndexConflict as e:
            if backend == "milvus":
                raise
            raise glue.refuse_overwrite(e.path, e.differences, "index_name", "rebuild") from e
        text = f"{index_name}: {report.summary()}"
        if backend == "milvus":
            text += f"\n{dst.describe()}"
        return io.NodeOutput(knn.open_database(dst), text, ui=ui.PreviewText(text))


class AtelierKNNIndexLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierKNNIndexLoader",
            display_name="Atelier kNN Load Index",
            category=CATEGORY,
            description="Opens a kNN index (database) from models/atelier/knn_index. Swapping the database "
                        "changes the neighbours, and so the picture, with nothing else changed.",
            inputs=[
                io.Combo.Input("database", options=index_names(), tooltip="An index built by Atelier kNN Build "
                               "Index (or tools/build_index.py). Refresh (R) after building a new one."),
                io.Combo.Input("memory_map", options=["auto", "on", "off"], default="auto",
                               tooltip="Map the index file instead of reading it into RAM. auto: only when it is "
                                       "larger than half the RAM."),
                io.Combo.Input("backend", options=list(BACKENDS), default="faiss", optional=True,
                               tooltip=BACKEND_TOOLTIP + " With milvus, the database list is not used: the "
                                       "collection input names it."),
                io.String.Input("milvus_uri", default="", optional=True, tooltip=URI_TOOLTIP),
                io.String.Input("collection", default="", optional=True,
                                tooltip="Milvus only: the collection (the index_name it was built under)."),
            ],
            outputs=[Index.Output("index", display_name="index", tooltip="The opened index."),
                     io.String.Output("info", display_name="info", tooltip="Images, embedding model, index type.")],
        )

    @classmethod
    def validate_inputs(cls, database: str, backend: str = "faiss", collection: str = ""):
        try:
            if backend == "milvus":  # the database list is not used; the collection is checked when it runs
                knn_milvus.check_collection_name(collection, "collection")
            else:
                index_dir(database)
        except knn.KNNError as e:
            return str(e)
        return True

    @classmethod
    def fingerprint_inputs(cls, database: str, memory_map: str, backend: str = "faiss", milvus_uri: str = "",
                           collection: str = ""):
        try:  # reload when the index is rebuilt
            if backend == "milvus":
                index = knn.open_database(milvus_target(milvus_uri, collection, "collection"))
                return (backend, milvus_uri, collection, index.manifest.get("updated"), len(index))
            return (database, memory_map, os.stat(index_dir(database) / "atelier_knn.json").st_mtime_ns)
        except (OSError, knn.KNNError):
            return float("nan")

    @classmethod
    def execute(cls, database: str, memory_map: str, backend: str = "faiss", milvus_uri: str = "",
                collection: str = "") -> io.NodeOutput:
        if backend == "milvus":
            index = knn.open_database(milvus_target(milvus_uri, collection, "collection"))
            where = f"{collection} ({index.target.describe()})"
        else:
            mmap = {"auto": "auto", "on": True, "off": False}[memory_map]
            index = knn.KNNIndex(index_dir(database), mmap=mmap, input_name="database")
            where = database
        info = (f"{where}: {len(index)} images, {index.dim}-d, {index.info['kind']} index, "
                f"embedder {index.embedder_info.get('name')}, folder {index.root}")
        return io.NodeOutput(index, info)


# ----------------------------------------------------------------------------- retrieve

class MissingHiddenStates(knn.KNNError, AttributeError):
    """An AttributeError (so hasattr/getattr-with-default still work) with an actionable message."""


class _PartialVisionOutput(comfy.clip_vision.Output):
    """A CLIP_VISION_OUTPUT holding only image_embeds; asking for hidden states says how to get them."""

    def __getattr__(self, key):
        if key.startswith("__"):
            raise AttributeError(key)
        raise MissingHiddenStates(
            f"This CLIP_VISION_OUTPUT from Atelier kNN Retrieve has image_embeds only, no '{key}'. Connect a CLIP "
            "Vision model to the Retrieve node's clip_vision input so it re-encodes the neighbour images.")


def _vision_output(fields: dict[str, torch.Tensor], partial: bool):
    out = _PartialVisionOutput() if partial else comfy.clip_vision.Output()
    for k, v in fields.items():
        out[k] = v
    return out


def _weighted(t, w: torch.Tensor):
    if not isinstance(t, torch.Tensor) or t.shape[0] != len(w):
        return t
    w = w.to(t.device, t.dtype).view(-1, *([1] * (t.ndim - 1)))
    return (t * w).sum(0, keepdim=True)


def _neighbour_images(index: knn.KNNIndex, hits: knn.Neighbours, size: int) -> tuple[torch.Tensor, list[str]]:
    imgs, missing = [], []
    for row, path in zip(hits.ids, hits.paths):
        try:
            imgs.append(index.load_image(int(row)))
        except knn.KNNError:
            missing.append(path)
            imgs.append(torch.full((size, size, 3), 0.5))
    return knn.to_square_batch(imgs, size), missing


class AtelierKNNRetrieve(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierKNNRetrieve",
            display_name="Atelier kNN Retrieve",
            category=CATEGORY,
            description="Finds the k images of the index nearest to a text (or image) query in CLIP space. "
                        "Outputs them as an image batch, their scores, and their embeddings as a "
                        "CLIP_VISION_OUTPUT for unCLIP Conditioning, Apply Style Model or IPAdapter.",
            inputs=[
                Index.Input("index", tooltip="From Atelier kNN Load Index or Build Index."),
                Embedder.Input("embedder", tooltip="The embedding model the index was built with."),
                io.String.Input("text", multiline=True, default="", tooltip="Text query (ignored when an image is "
                                "connected)."),
                io.Int.Input("k", default=4, min=1, max=64, tooltip="Number of neighbours."),
                io.Combo.Input("combine", options=["weighted mean", "all neighbours"], default="weighted mean",
                               tooltip="CLIP_VISION_OUTPUT as one score-weighted mean (for unCLIP and single-image "
                                       "adapters) or one row per neighbour (a batch, e.g. for IPAdapter)."),
                io.Float.Input("temperature", default=0.05, min=0.0, max=10.0, step=0.005,
                               tooltip="Softmax temperature over the cosine scores for the weights; 0 weighs all "
                                       "neighbours equally, small values favour the closest."),
                io.Int.Input("image_size", default=512, min=64, max=2048, step=8,
                             tooltip="Side of the square neighbour images (centre-cropped)."),
                io.Image.Input("image", optional=True, tooltip="Query by image instead of text (first of the batch)."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Re-encode the neighbour images with this model so the CLIP_VISION_OUTPUT "
                                            "carries hidden states too (style models, IPAdapter)."),
                io.Boolean.Input("allow_other_model", default=False, optional=True,
                                 tooltip="Query with a model other than the one the index was built with (same "
                                         "dimension). Only if you know both embed into the same space."),
                io.StyleModel.Input("style_model", optional=True,
                                    tooltip="Optional: the style model (Load Style Model, e.g. Flux Redux) that Apply "
                                            "Style Model feeds this clip_vision_output to, to check now that the CLIP "
                                            "vision model encoding the neighbours makes the hidden states it reads."),
            ],
            outputs=[
                io.Image.Output("images", display_name="images", tooltip="The neighbours, best first."),
                io.ClipVisionOutput.Output("clip_vision_output", display_name="clip_vision_output",
                                           tooltip="Their CLIP embeddings."),
                Neighbours.Output("neighbours", display_name="neighbours",
                                  tooltip="Neighbours, scores and embeddings for Atelier kNN "
                                                        "Conditioning."),
                io.String.Output("report", display_name="report", tooltip="Rank, score and file of each neighbour."),
                io.Float.Output("scores", display_name="scores",
                                tooltip="Cosine similarity of each neighbour (a list).",
                                is_output_list=True),
            ],
        )

    @classmethod
    def execute(cls, index, embedder, text: str, k: int, combine: str, temperature: float, image_size: int,
                image=None, clip_vision=None, allow_other_model: bool = False, style_model=None) -> io.NodeOutput:
        strict = not allow_other_model
        if style_model is not None:  # before any work: the space the style model reads
            check_style_space(style_model, clip_vision or getattr(embedder, "clip_vision", None),
                              "clip_vision" if clip_vision is not None or getattr(embedder, "clip_vision", None) is None
                              else "embedder")
        if image is not None:
            hits = index.query_image(embedder, image[:1], k, strict=strict)
        else:
            hits = index.query_text(embedder, text, k, strict=strict)
        images, missing = _neighbour_images(index, hits, image_size)
        weights = torch.from_numpy(knn.neighbour_weights(hits.scores, temperature)).float()
        clip_vision = clip_vision or getattr(embedder, "clip_vision", None)
        if clip_vision is not None:
            enc = clip_vision.encode_image(images, crop=True)
            fields = {k_: getattr(enc, k_) for k_ in vars(enc)}
            partial = False
        else:
            fields = {"image_embeds": torch.from_numpy(hits.embeddings)}
            partial = True
        if combine == "weighted mean":
            fields = {k_: _weighted(v, weights) for k_, v in fields.items()}
        lines = [f"{i + 1}. {s:.4f}  {p}" for i, (s, p) in enumerate(zip(hits.scores, hits.paths))]
        if missing:
            lines.append(f"missing since the index was built (grey): {', '.join(missing)}; rebuild the index")
        report = "\n".join(lines)
        return io.NodeOutput(images, _vision_output(fields, partial), hits, report,
                             [float(s) for s in hits.scores], ui=ui.PreviewImage(images, cls=cls))


# ----------------------------------------------------------------------------- conditioning

def _check_unclip_model(model, dim: int) -> None:
    base = getattr(model, "model", None)
    aug = getattr(base, "noise_augmentor", None)
    if aug is None:
        raise glue.fail("model", f"{type(base).__name__} takes no CLIP image embedding (unCLIP), so this "
                        "conditioning would be ignored", "use an SD2.1 unCLIP or SDXL checkpoint, or send Retrieve's "
                        "clip_vision_output to IPAdapter / Apply Style Model (Flux Redux)", cls=knn.KNNError)
    want = int(aug.data_mean.shape[-1])
    if want != dim:
        raise glue.fail("neighbours", f"Dimension mismatch: the model reads {want}-d CLIP image embeddings, the index "
                        f"holds {dim}-d ones", "build the index with the matching CLIP (e.g. ViT-H/14 for 1024 "
                        "(SD2.1 unCLIP-h), ViT-bigG / clip_vision_g for 1280 (SDXL revision), ViT-L for 768)",
                        cls=knn.KNNError)


class AtelierKNNConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierKNNConditioning",
            display_name="Atelier kNN Conditioning",
            category=CATEGORY,
            description="KNN-Diffusion on the models you have: conditions on the image embeddings of the retrieved "
                        "neighbours (and optionally the query) through unCLIP conditioning, which SD2.1 unCLIP and "
                        "SDXL (revision) read. Chain after your text conditioning.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="Text conditioning to add the neighbours to."),
                Neighbours.Input("neighbours", tooltip="From Atelier kNN Retrieve."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Overall weight of the retrieved embeddings."),
                io.Float.Input("temperature", default=0.05, min=0.0, max=10.0, step=0.005,
                               tooltip="Softmax temperature over the neighbours' scores; 0: equal weights."),
                io.Float.Input("query_weight", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of the query's own embedding (KNN-Diffusion conditions on it too). "
                                       "Text embeddings sit apart from image embeddings in CLIP space; keep it low "
                                       "for text queries."),
                io.Combo.Input("mode", options=["weighted mean", "separate entries"], default="weighted mean",
                               tooltip="weighted mean: one embedding, norm kept. separate entries: one unCLIP entry "
                                       "per neighbour, merged by the model with noise augmentation."),
                io.Float.Input("noise_augmentation", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="unCLIP noise augmentation: higher follows the neighbours more loosely."),
                io.Model.Input("model", optional=True, tooltip="Optional: the model you sample with, to check now "
                               "that it reads unCLIP embeddings of this size."),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning", tooltip="Conditioning with the neighbours attached.")],
        )

    @classmethod
    def execute(cls, conditioning, neighbours, strength: float, temperature: float, query_weight: float, mode: str,
                noise_augmentation: float, model=None) -> io.NodeOutput:
        dim = int(neighbours.embeddings.shape[1])
        if model is not None:
            _check_unclip_model(model, dim)
        if strength == 0:
            return io.NodeOutput(conditioning)
        if mode == "weighted mean":
            vec, _ = knn.combine_neighbours(neighbours, temperature, query_weight)
            entries = [(vec, strength)]
        else:
            w = knn.neighbour_weights(neighbours.scores, temperature) * (1.0 - query_weight)
            entries = [(e, strength * float(wi)) for e, wi in zip(neighbours.embeddings, w)]
            if query_weight > 0:
                entries.append((neighbours.query, strength * query_weight))
        unclip = [{"clip_vision_output": _vision_output({"image_embeds": torch.from_numpy(np.asarray(v))[None]}, True),
                   "strength": s, "noise_augmentation": noise_augmentation} for v, s in entries if not math.isclose(s, 0)]
        out = []
        for emb, opts in conditioning:
            opts = opts.copy()
            opts["unclip_conditioning"] = list(opts.get("unclip_conditioning", [])) + unclip
            out.append([emb, opts])
        return io.NodeOutput(out)


NODES = [
    AtelierWorldFolder,
    AtelierKNNOpenCLIPLoader,
    AtelierKNNCLIPVisionEmbedder,
    AtelierKNNBuildIndex,
    AtelierKNNIndexLoader,
    AtelierKNNRetrieve,
    AtelierKNNConditioning,
]
