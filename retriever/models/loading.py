"""Resolving and loading open_clip models: bundled, pretrained tags, checkpoint files, hub and local dirs.

Loading goes through open_clip's own factory. What this module adds is a model identity
(`fingerprint`) that indexes record, and a fast, clear failure when weights would have to be
downloaded but cannot be: open_clip alone retries for about 46 s and then says little.
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from retriever.errors import ModelError
from retriever.models.images import REFERENCE_SIDE, SafePreprocess
from retriever.models.safety import check_checkpoint, check_model_config, read_config

BUNDLED_DIR = Path(__file__).parent / "weights"
DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
_HUB_PROBE_TIMEOUT_S = 1.0


@dataclass
class ModelSpec:
    """What the user asked for: an open_clip name (maybe `hf-hub:`/`local-dir:`) and optional weights."""

    name: str
    pretrained: str | None = None

    def __str__(self) -> str:
        return f"{self.name} ({self.pretrained})" if self.pretrained else self.name


@dataclass
class LoadedModel:
    """An open_clip model with its own tokenizer and eval transform, ready for encoding."""

    spec: ModelSpec
    model: Any
    preprocess: Any
    tokenizer: Any
    fingerprint: str
    embed_dim: int
    context_length: int
    device: str
    extra: dict = field(default_factory=dict)

    def describe(self) -> dict:
        """The model's identity as recorded in an index manifest."""
        return {
            "name": self.spec.name,
            "pretrained": self.spec.pretrained,
            "fingerprint": self.fingerprint,
            "embed_dim": self.embed_dim,
            "context_length": self.context_length,
        }

    @property
    def pad_token_id(self) -> int:
        """The id the tokenizer pads with: 0 for open_clip's BPE and BERT's WordPiece, 1 for
        XLM-R (multilingual open_clip towers); Hugging Face tokenizers say which."""
        tokenizer = self.tokenizer
        for source in (tokenizer, getattr(tokenizer, "tokenizer", None)):
            pad = getattr(source, "pad_token_id", None)
            if isinstance(pad, int):
                return pad
        return 0


def bundled_models() -> list[str]:
    """Names of the models that ship inside the package (trained by scripts/ on the toy world)."""
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(
        p.name
        for p in BUNDLED_DIR.iterdir()
        if (p / "open_clip_config.json").is_file() or (p / "cn_clip_config.json").is_file()
    )


def list_models() -> list[dict]:
    """Every model `load_model` can take: bundled ones, and open_clip's pretrained tags with cache state."""
    import open_clip

    from retriever.models import cnclip

    rows = [
        {"model": name, "pretrained": None, "source": "bundled", "available_offline": True} for name in bundled_models()
    ]
    for arch in cnclip.ARCHS:
        rows.append(
            {
                "model": cnclip.PREFIX + arch,
                "pretrained": None,
                "source": "hf-hub",
                "available_offline": cnclip.cached_hub_weights(arch) is not None,
            }
        )
    for name, tag in open_clip.list_pretrained():
        cfg = open_clip.get_pretrained_cfg(name, tag)
        rows.append(
            {
                "model": name,
                "pretrained": tag,
                "source": "hf-hub" if cfg.get("hf_hub") else "url",
                "available_offline": _cached_pretrained_file(cfg) is not None,
            }
        )
    return rows


def sha256_file(path: str | Path, chunk_size: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def pick_device(device: str | None = None) -> str:
    """`device` if given, else cuda, then mps, then cpu."""
    if device:
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def load_model(
    name: str = DEFAULT_MODEL,
    pretrained: str | None = DEFAULT_PRETRAINED,
    device: str | None = None,
    precision: str = "fp32",
    random_weights: bool = False,
) -> LoadedModel:
    """Load an open_clip model for encoding.

    Args:
        name: a bundled model (`toyworld`, `toyworld-zh`), an open_clip architecture (`ViT-B-32`),
            a Chinese-CLIP architecture (`cn-clip:ViT-B-16`), `hf-hub:org/name`, or `local-dir:path`.
        pretrained: for an architecture name, a pretrained tag (`laion2b_s34b_b79k`) or a
            checkpoint file (`.safetensors`, `.pt`, `.bin`; for `cn-clip:` a checkpoint in
            cn_clip's format, else the released weights); ignored for the other kinds.
        device: `cuda`, `mps`, `cpu`, or None to pick the best available.
        precision: `fp32`, or `fp16` / `bf16` to halve memory and speed up GPUs (outputs are
            still returned as float32).
        random_weights: the architecture only, freshly initialised (training from scratch).

    Raises:
        ModelError: unknown name or tag, missing file, or weights that would need a download
            that cannot happen.
    """
    import open_clip

    spec = ModelSpec(name, pretrained)
    device = pick_device(device)
    if precision not in ("fp32", "fp16", "bf16"):
        raise ModelError(f"unknown precision {precision!r}; use fp32, fp16 or bf16")
    kwargs: dict[str, Any] = {}
    chinese = _chinese_clip_dir(name)
    if chinese is not None or name.startswith("cn-clip:"):
        return _load_chinese_clip(spec, chinese, device, precision, random_weights)
    # Every kind of reference has its config sized and its pickled weights opened safely before
    # open_clip builds anything: the reference may come from a downloaded index's manifest.
    if name in bundled_models() or name.startswith("local-dir:"):
        bundled = name in bundled_models()
        directory = BUNDLED_DIR / name if bundled else Path(name[len("local-dir:") :]).expanduser()
        if not (directory / "open_clip_config.json").is_file():
            raise ModelError(f"{directory}: not a model directory (no open_clip_config.json)")
        read_config(directory / "open_clip_config.json")
        spec.pretrained = None
        open_clip_name, open_clip_pretrained = f"local-dir:{directory}" if bundled else name, None
        weights = _weights_in_dir(directory)
        if not random_weights:
            check_checkpoint(_open_clip_choice(directory) or weights)
        fingerprint = f"sha256:{sha256_file(weights)}"
    elif name.startswith("hf-hub:"):
        spec.pretrained = None
        read_config(_hub_file(name[len("hf-hub:") :], "open_clip_config.json", what=name))
        open_clip_name, open_clip_pretrained = name, None
        fingerprint = name
    else:
        if name not in open_clip.list_models():
            raise ModelError(f"unknown model {name!r}; `retriever models` lists the available ones")
        check_model_config(open_clip.get_model_config(name) or {}, name)
        open_clip_name = name
        text_dir = _hf_text_dir(open_clip.get_model_config(name) or {}, str(spec))
        if random_weights:
            open_clip_pretrained, fingerprint = None, ""
        else:
            open_clip_pretrained, fingerprint, kwargs = _resolve_weights(name, pretrained)
            if os.path.isfile(open_clip_pretrained):  # a tag still to download is checked by open_clip's loader
                check_checkpoint(open_clip_pretrained)
        if text_dir is not None:
            # The cached copy by path: neither open_clip nor transformers then asks the hub for it.
            text_cfg = {
                **open_clip.get_model_config(name)["text_cfg"],
                "hf_model_name": str(text_dir),
                "hf_tokenizer_name": str(text_dir),
                "hf_model_pretrained": False,
            }
            kwargs["text_cfg"] = text_cfg

    if random_weights:
        spec.pretrained, open_clip_pretrained, fingerprint = None, None, f"random:{name}"
        kwargs = {"load_weights": False, **({"text_cfg": kwargs["text_cfg"]} if "text_cfg" in kwargs else {})}
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            open_clip_name, pretrained=open_clip_pretrained, device=device, precision=precision, **kwargs
        )
        if "text_cfg" in kwargs:
            text_cfg = kwargs["text_cfg"]
            tokenizer = open_clip.tokenizer.HFTokenizer(
                text_cfg["hf_tokenizer_name"],
                context_length=text_cfg.get("context_length", 77),
                tokenizer_mode=text_cfg.get("tokenizer_mode"),
                **text_cfg.get("tokenizer_kwargs", {}),
            )
        else:
            tokenizer = open_clip.get_tokenizer(open_clip_name)
    except ModelError:
        raise
    except Exception as e:  # user files reach open_clip, timm and safetensors: any type can come back
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load {spec}: {reason}") from None
    decoder = getattr(model, "text_decoder", None)
    if random_weights and decoder is not None and getattr(decoder, "text_projection", None) is not None:
        # open_clip's CoCa decoder (MultimodalTransformer) leaves its output projection as
        # torch.empty garbage (its init_parameters is never called, and fails if called): training
        # from it gives NaN. Initialise it as that method means to.
        import torch

        torch.nn.init.normal_(decoder.text_projection, std=decoder.width**-0.5)
    loaded = wrap_model(spec, model, preprocess, tokenizer, fingerprint, device)
    loaded.extra.update(open_clip_name=open_clip_name, quick_gelu=bool(kwargs.get("force_quick_gelu")))
    return loaded


# Files a Hugging Face text tower needs besides open_clip's weights: its config and a tokenizer.
HF_TEXT_FILES = ("config.json", "tokenizer_config.json", "tokenizer.json", "sentencepiece.bpe.model")


def _hf_text_dir(model_cfg: dict, what: str) -> Path | None:
    """The local copy of a Hugging Face text tower's config and tokenizer (multilingual models such
    as `xlm-roberta-base-ViT-B-32`), None when the model has no such tower.

    Raises:
        ModelError: not cached and the hub cannot be reached (at once, naming the repository and files).
    """
    text_cfg = model_cfg.get("text_cfg") or {}
    repo = text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name")
    if not repo:
        return None
    if Path(repo).is_dir():
        return Path(repo)
    from huggingface_hub import try_to_load_from_cache

    found = {f: try_to_load_from_cache(repo, f) for f in HF_TEXT_FILES}
    config = found["config.json"]
    if isinstance(config, str) and any(isinstance(found[f], str) for f in HF_TEXT_FILES[2:]):
        return Path(config).parent
    what = (
        f"{what}'s text tower ({repo} on the Hugging Face hub: `huggingface-cli download {repo} "
        f"{' '.join(HF_TEXT_FILES)}`)"
    )
    _probe("https://" + _hub_host(), what)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, allow_patterns=list(HF_TEXT_FILES)))
    except Exception as e:  # missing repo, HTTP errors
        raise ModelError(
            f"{what}: cannot download ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
        ) from None


def _chinese_clip_dir(name: str) -> Path | None:
    """The directory of a bundled or `local-dir:` Chinese-CLIP model (one with cn_clip_config.json), else None."""
    from retriever.models import cnclip

    if name in bundled_models():
        directory = BUNDLED_DIR / name
    elif name.startswith("local-dir:"):
        directory = Path(name[len("local-dir:") :]).expanduser()
    else:
        return None
    return directory if cnclip.is_model_dir(directory) else None


def _load_chinese_clip(
    spec: ModelSpec, directory: Path | None, device: str, precision: str, random_weights: bool
) -> LoadedModel:
    """A Chinese-CLIP model (see `retriever.models.cnclip`) as a LoadedModel."""
    import torch

    from retriever.models import cnclip
    from retriever.models.wordpiece import WordPieceTokenizer

    context_length = 52
    if directory is not None:
        data = cnclip.read_dir_config(directory)
        cfg, context_length = data["model_cfg"], data.get("context_length", 52)
        spec.pretrained = None
        found = _weights_in_dir(directory)
        weights: Path | str | None = found
        fingerprint = f"sha256:{sha256_file(found)}"
    else:
        cfg = cnclip.arch_config(spec.name[len(cnclip.PREFIX) :])
        if spec.pretrained == DEFAULT_PRETRAINED:
            spec.pretrained = None  # the open_clip default tag means nothing here: the released weights
        if random_weights:
            weights, fingerprint = None, f"random:{spec.name}"
        elif spec.pretrained:
            weights = Path(spec.pretrained).expanduser()
            if not weights.is_file():
                raise ModelError(
                    f"{spec.pretrained}: no such checkpoint file (for {spec.name}, --pretrained takes a "
                    f"checkpoint in cn_clip's format, or nothing for the released weights)"
                )
            fingerprint = f"sha256:{sha256_file(weights)}"
        else:
            weights, fingerprint = (
                cnclip.hub_weights(spec.name[len(cnclip.PREFIX) :], what=spec.name),
                f"{spec.name}/{cnclip.HUB_ORG}",
            )
    source = str(weights or spec.name)
    state = None if random_weights or weights is None else cnclip.read_state_dict(weights)
    try:
        model = cnclip.build(cfg, state, source)
    except ModelError:
        raise
    except Exception as e:  # a config that passed the checks but still cannot be built
        raise ModelError(
            f"cannot load {spec}: {str(e).splitlines()[0][:300] if str(e) else type(e).__name__}"
        ) from None
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    model = model.to(device=device, dtype=dtype)
    preprocess = SafePreprocess(cnclip.preprocess_for(cfg["image_resolution"]), cfg["image_resolution"])
    loaded = wrap_model(spec, model, preprocess, WordPieceTokenizer(context_length=context_length), fingerprint, device)
    loaded.extra.update(family="cn-clip", cn_clip_cfg=cfg)
    return loaded


def split_model_ref(ref: str) -> tuple[str, str | None]:
    """`NAME:TAG` (as `--generator` takes it) into (name, tag); `hf-hub:` and `local-dir:` names have no tag."""
    if ref.startswith(("hf-hub:", "local-dir:")):
        return ref, None
    name, _, tag = ref.partition(":")
    return name, tag or None


def wrap_model(
    spec: ModelSpec, model: Any, preprocess: Any, tokenizer: Any, fingerprint: str, device: str
) -> LoadedModel:
    """A LoadedModel around an open_clip model built elsewhere (benchmarks, training).

    open_clip's CLIP BPE tokenizer is swapped for `FastClipTokenizer` (the same ids, many times
    faster; RETRIEVER_TOKENIZER=open_clip keeps open_clip's own).
    """
    from retriever.models.fast_tokenizer import fast_tokenizer

    model.eval()
    if os.environ.get("RETRIEVER_TOKENIZER", "fast") != "open_clip":
        tokenizer = fast_tokenizer(tokenizer)
    context_length: Any = getattr(tokenizer, "context_length", None) or getattr(model, "context_length", 77)
    context_length = int(context_length)
    if preprocess is not None and not isinstance(preprocess, SafePreprocess):
        preprocess = SafePreprocess(preprocess, _image_side(model, preprocess))
    return LoadedModel(spec, model, preprocess, tokenizer, fingerprint, _embed_dim(model), context_length, device)


def _image_side(model: Any, preprocess: Any) -> int:
    """The side the eval transform resizes to (its first Resize), else the vision tower's input size."""
    for step in getattr(preprocess, "transforms", [])[:1]:
        size = getattr(step, "size", None)
        if isinstance(size, int) or (isinstance(size, (list, tuple)) and len(size) == 1):
            return int(size if isinstance(size, int) else size[0])
    side: Any = getattr(getattr(model, "visual", None), "image_size", REFERENCE_SIDE)
    return int(max(side) if isinstance(side, (list, tuple)) else side)


def _open_clip_choice(directory: Path) -> str | None:
    """The weights file open_clip itself will pick in a model directory."""
    from open_clip import factory

    find = getattr(factory, "_find_checkpoint_in_dir", None)
    return find(directory) if find is not None else None


def _resolve_weights(name: str, pretrained: str | None) -> tuple[str, str, dict]:
    """(what to pass open_clip as `pretrained`, fingerprint, extra kwargs) for an architecture name."""
    import open_clip

    if not pretrained:
        raise ModelError(
            f"{name} needs weights: give --pretrained TAG or a checkpoint file "
            f"(tags: {', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'})"
        )
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if cfg:
        # Pass the cached file itself, so open_clip never contacts the hub when the weights are here.
        cached = _cached_pretrained_file(cfg)
        if cached is None:
            _require_download(cfg, what=f"{name} ({pretrained})")
            return pretrained, f"{name}/{pretrained}", {}
        preprocess = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
        kwargs: dict[str, Any] = {"force_preprocess_cfg": preprocess} if preprocess else {}
        if cfg.get("quick_gelu"):
            kwargs["force_quick_gelu"] = True
        return cached, f"{name}/{pretrained}", kwargs
    path = Path(pretrained).expanduser()
    if path.is_file():
        return str(path), f"sha256:{sha256_file(path)}", {}
    tags = open_clip.list_pretrained_tags_by_model(name)
    raise ModelError(
        f"{pretrained!r} is neither a pretrained tag of {name} nor a file (tags: {', '.join(tags) or 'none'})"
    )


def _weights_in_dir(directory: Path) -> Path:
    for candidate in (
        "open_clip_model.safetensors",
        "open_clip_pytorch_model.bin",
        "model.safetensors",
        "pytorch_model.bin",
    ):
        if (directory / candidate).is_file():
            return directory / candidate
    found = sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin")) + sorted(directory.glob("*.pt*"))
    if not found:
        raise ModelError(f"{directory}: no weights file (.safetensors, .bin, .pt)")
    return found[0]


def _embed_dim(model: Any) -> int:
    projection = getattr(model, "text_projection", None)
    if projection is not None and hasattr(projection, "shape"):
        return int(projection.shape[-1])
    import torch

    with torch.inference_mode():
        tokens = torch.zeros((1, 4), dtype=torch.long, device=next(model.parameters()).device)
        return int(model.encode_text(tokens).shape[-1])


def _cached_pretrained_file(cfg: dict) -> str | None:
    """The local path of a pretrained tag's weights if already downloaded, else None."""
    if cfg.get("file"):
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(cfg["hf_hub"])
        candidates = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        for candidate in candidates:
            found = try_to_load_from_cache(repo_id, candidate)
            if isinstance(found, str):
                return found
        return None
    if cfg.get("url"):
        cached = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg["url"])
        return str(cached) if cached.is_file() else None
    return None


def _require_download(cfg: dict, what: str) -> None:
    """Raise at once, with advice, when `cfg`'s weights are not cached and the hub can't be reached."""
    if cfg.get("hf_hub"):
        _probe("https://" + _hub_host(), what)
    elif cfg.get("url"):
        _probe(cfg["url"], what)


def _hub_file(repo_id: str, filename: str, what: str) -> Path:
    """A hub file's local path: from the cache, else downloaded (after a quick reachability probe)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, filename)
    if isinstance(cached, str):
        return Path(cached)
    _probe("https://" + _hub_host(), what)
    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as e:  # missing repo, missing file, HTTP errors
        raise ModelError(
            f"{what}: cannot download {filename} ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
        ) from None


def _hub_host() -> str:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return urlparse(endpoint).netloc or "huggingface.co"


def _offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _probe(url: str, what: str) -> None:
    advice = (
        "download it once on a machine with network (it is then cached), pass a local checkpoint with "
        "--pretrained FILE or --model local-dir:DIR, or try the bundled offline model with --model toyworld"
    )
    if _offline():
        raise ModelError(f"{what} is not downloaded and HF_HUB_OFFLINE is set: {advice}")
    parsed = urlparse(url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 443), timeout=_HUB_PROBE_TIMEOUT_S).close()
    except OSError:
        raise ModelError(f"{what} is not downloaded and {parsed.hostname} cannot be reached: {advice}") from None
