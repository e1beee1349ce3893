"""Save a quantized model as safetensors + JSON, and load it back, bit-for-bit.

Layout of an export folder (format ``qvlm-packed``, version :data:`FORMAT_VERSION`):

* ``qvlm_quant.json``   format name and version, the ``QuantConfig``, the base model's name,
  one entry per packed Linear (bits, format, group, shape, activation quantizer) and the run's
  statistics;
* ``model.safetensors`` every tensor: packed codes, steps, zero points, activation ranges, AWQ
  smoothing vectors, and the full-precision tensors that stay unquantized (embeddings, norms,
  projector, lm_head, biases: in the checkpoint's own dtype, ``storage_dtype``, wherever that is
  lossless), the vision rotations once per width; no pickle anywhere;
* ``config.json`` and the processor files, so the folder is self-contained (no base download).

Versions: 3 (this one) stores each vision rotation once (``rotation_key``) and the model's floats in
its checkpoint's dtype (``storage_dtype``; loaded back in ``dtype``). 2 allows any layer width (a uniform row's last group and NormalFloat's last
flattened block may be shorter, :class:`~qvlm.quant.quantizers.EncodedWeight`), spells NormalFloat
``"nf4"`` and stores its absmax as [n_blocks]. Version 1 folders (every width a multiple of the
group, NormalFloat spelled ``"nf"``, absmax [out, in / group]) hold the same numbers in the same
order, so they are read as they are; a reader of version 1 refuses a version 2 folder by its version.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from qvlm.data.tasks import DEFAULT_TASK, recorded_task
from qvlm.export.bitsandbytes import BITSANDBYTES, bitsandbytes_refusal, effective_weight, save_bitsandbytes
from qvlm.export.layout import (
    ACTIVATION_SIDECAR,
    WEIGHTS,
    load_snippet,
    rotated_tower_note,
    shown_path,
    without_paths,
    in_dtype,
    unquantized_tensors,
    unshared,
    write_activation_sidecar,
    write_model_files,
    write_readme,
)
from qvlm.models import (
    PACKED_EXPORT_MANIFEST,
    ModelLoadError,
    VLMHandle,
    build_layer_map,
    is_packed_export,
    load_vlm,
    model_classes,
    resolve_device,
)
from qvlm.models.loader import resolve_source
from qvlm.quant.integer import takes_dynamic_ranges, use_integer_kernels
from qvlm.quant.packing import PackedLinear, pack_model, unpack_bits
from qvlm.quant.qlinear import replace_module
from qvlm.quant.quantizers import ActQuantizer
from qvlm.quant.recipes import get_recipe, resolve_weights

if TYPE_CHECKING:
    from qvlm.quant.config import QuantConfig

FORMAT_NAME = "qvlm-packed"
FORMAT_VERSION = 3
ROTATION_PREFIX = "qvlm.vision_rotation."
"""Name prefix of the shared rotation matrices of an export (one per input width; read by version 3 loaders
through each entry's ``rotation_key``, older folders hold one per layer as ``<layer>.act.rotation``)."""
READABLE_VERSIONS = (1, 2, 3)
LEGACY_FORMAT_NAMES = {"nf": "nf4"}  # version 1 spelled NormalFloat "nf"
MANIFEST = PACKED_EXPORT_MANIFEST
COMPRESSED_TENSORS = "compressed-tensors"
SAVE_FORMATS = (FORMAT_NAME, COMPRESSED_TENSORS, BITSANDBYTES)
"""What :func:`save_quantized` writes: the project's packed layout, compressed-tensors (uniform weights;
transformers, vLLM and llm-compressor load it) or bitsandbytes (NF4 weights; transformers loads ``Linear4bit``s)."""


class ExportError(ModelLoadError):
    """A folder that is not a readable export of this format version."""


def _act_entry(act: ActQuantizer | None) -> dict[str, Any] | None:
    """The manifest entry of an input quantizer (its ranges, and its rotation, are stored as tensors);
    a dynamic one ("dynamic_token") has no ranges to store: its granularity, and its clip factor if it has one, say
    it all."""
    if act is None or not (act.calibrated or act.dynamic):
        return None
    entry = {"bits": act.bits, "granularity": act.granularity}
    if act.dynamic and act.clip is not None:
        entry["clip"] = float(act.clip)
    return entry if act.rotation is None else {**entry, "rotated": True}


def shared_rotation_key(rotation: torch.Tensor, seen: list[tuple[str, torch.Tensor]]) -> str:
    """The tensor name ``rotation`` is stored under: that of an equal one already in ``seen``, else a new one.

    Why: the vision rotation is one matrix per input width, but each quantizer holds its own copy; written
    per layer, the rotations were 18.6 MB of the mosaic model's 25 MB W4A4 export (its FP16 file: 20 MB).
    """
    for key, held in seen:
        if held.shape == rotation.shape and torch.equal(held, rotation):
            return key
    key = f"{ROTATION_PREFIX}{len(seen)}"
    seen.append((key, rotation))
    return key


def save_quantized(handle: VLMHandle, out_dir: str | Path, config_dict: dict, stats: dict | None = None,
                   format: str = FORMAT_NAME, rotated_tower: str = "nf4") -> Path:
    """Write ``handle`` (whose quantized Linears are packed, or get packed here) to ``out_dir`` in ``format``
    (:data:`SAVE_FORMATS`; compressed-tensors: :func:`save_compressed_tensors`; bitsandbytes:
    :func:`save_bitsandbytes`, which alone reads ``rotated_tower``, :data:`~qvlm.export.bitsandbytes.ROTATED_TOWER`)."""
    if format not in SAVE_FORMATS:
        raise ValueError(f"unknown save format {format!r}; expected one of {', '.join(SAVE_FORMATS)}")
    if format == COMPRESSED_TENSORS:
        return save_compressed_tensors(handle, out_dir, config_dict, stats)
    if format == BITSANDBYTES:
        return save_bitsandbytes(handle, out_dir, config_dict, stats, rotated_tower=rotated_tower)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pack_model(handle.model)
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict] = {}
    rotations: list[tuple[str, torch.Tensor]] = []
    packed_names = set()
    for name, m in handle.model.named_modules():
        if not isinstance(m, PackedLinear):
            continue
        packed_names.add(name)
        modules[name] = {"bits": m.bits, "format": m.fmt, "group": m.group, "shape": [m.out_features, m.in_features],
                         "tower": m.tower, "role": m.role, "act": _act_entry(m.act),
                         "bias": m.bias is not None, "smooth": m.smooth is not None}
        for key in ("packed", "scale", "zero", "smooth", "bias"):
            t = m.code_stream() if key == "packed" else getattr(m, key)
            if t is not None:
                t = in_dtype(t, handle.save_dtype, lossless_only=True) if key == "bias" else t
                tensors[f"{name}.{key}"] = t.detach().contiguous().cpu()
        if m.act is not None and m.act.calibrated:
            tensors[f"{name}.act.lo"] = m.act.lo.contiguous().cpu()
            tensors[f"{name}.act.hi"] = m.act.hi.contiguous().cpu()
        if m.act is not None and m.act.rotation is not None:
            # one rotation per input width serves every layer of that width: written once
            key = shared_rotation_key(m.act.rotation, rotations)
            modules[name]["act"]["rotation_key"] = key
            tensors.setdefault(key, m.act.rotation.contiguous().cpu())
    for key, t in unquantized_tensors(handle.model, packed_names, handle.save_dtype, lossless_only=True).items():
        tensors.setdefault(key, t)
    save_file(unshared(tensors), str(out / WEIGHTS), metadata={"format": FORMAT_NAME, "version": str(FORMAT_VERSION)})
    write_model_files(handle, out)
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "base_model": handle.name,
                "task": handle.task, "dtype": str(handle.dtype).removeprefix("torch."),
                "storage_dtype": str(handle.save_dtype).removeprefix("torch."), "quant_config": config_dict,
                "modules": modules, "stats": stats or {}}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return out


def export_refusal(config: "QuantConfig", format: str) -> str | None:
    """Why ``format`` cannot hold a model quantized with ``config``, or None when it can: the one source of
    the reasons the CLI refuses ``--format`` with and the app's format menu shows.

    Asked before quantizing (CLI) or before writing (app), so nobody waits for a run the export
    then refuses; the writers still check the packed layers themselves.
    """
    if format not in SAVE_FORMATS:
        return f"unknown save format {format!r}; expected one of {', '.join(SAVE_FORMATS)}."
    if format == FORMAT_NAME:
        return None
    init = get_recipe(config.recipe).init
    if init is not None and init.scaling == "awq":
        return (f"{format} has no place for AWQ's per-channel input scales (recipe {config.recipe!r}): "
                f"download it as {FORMAT_NAME}.")
    if format == BITSANDBYTES:
        return bitsandbytes_refusal(config)
    weights, _ = resolve_weights(config)
    if weights == "nf4":
        return (f"{COMPRESSED_TENSORS} needs uniform (integer) weights: this variant has NF4 weights (recipe "
                f"{config.recipe!r}); download it as {BITSANDBYTES} (NF4, plain from_pretrained loads it) or "
                f"{FORMAT_NAME}, or quantize with uniform weights (recipe 'rtn'; CLI: a --config file holding "
                f"{{\"weight_format\": \"uniform\"}}).")
    return None


def save_compressed_tensors(handle: VLMHandle, out_dir: str | Path, config_dict: dict,
                            stats: dict | None = None) -> Path:
    """Write ``handle`` as a compressed-tensors checkpoint (``pack-quantized``; W8A8 layers ``int-quantized``);
    return the folder.

    Plain ``LlavaForConditionalGeneration.from_pretrained(out_dir)`` loads it with transformers and the
    ``compressed-tensors`` package, and ``generate`` answers under ``torch.no_grad()`` and
    ``torch.inference_mode()``. Where every compressed Linear is in the language model, the
    ``quantization_config`` is the one llm-compressor writes (no ``"dequantize"``) and the loaded Linears hold the
    codes: compressed-tensors 0.20 has no kernel that multiplies by them (its ``run_compressed`` argument is
    accepted and unused) and decompresses every Linear on the model's first forward call, which
    :func:`qvlm.export.sizes.plain_load_bytes` measures and the README says. Where the vision tower or the
    projector holds compressed Linears, ``"dequantize": true`` decompresses them while loading: transformers 5.25's
    ``generate`` runs ``get_image_features`` before the model's forward (and so before compressed-tensors'
    decompression hook, a forward pre-hook on the whole model), where a compressed Linear has int8 or no
    ``weight`` ("self and mat2 must have the same dtype", "'Linear' object has no attribute 'weight'"). Each packed uniform Linear (vision tower included) becomes its codes, scales and zero points
    (:func:`ct_weight_tensors`). Strategy "channel" for one range per row, "group" otherwise; one config group
    per (bits, group size, activation scheme) naming its modules exactly. Everything else stays in floating point.

    Activations: a layer that quantizes its input per token row on the row's own range at run time (the
    ``deployable`` preset's ``dynamic_token``) is what compressed-tensors' dynamic asymmetric ``token`` input
    scheme describes, so it is written there and a loader or serving engine applies it; one whose rows' ranges
    are clipped by a factor (``act_dynamic_clip``) is not (the scheme has no factor): its factor goes to the sidecar. Static ranges go to
    :data:`ACTIVATION_SIDECAR` instead: the project's are per input channel (LLM) or per token position
    (vision tower), and compressed-tensors' static input activations are per tensor. A layer whose input
    the run rotates (``vision_rotation``) is written as its un-rotated float weight
    (:func:`~qvlm.export.bitsandbytes.effective_weight`) and left out of every config group.

    Raises ValueError for what the format cannot hold: NormalFloat weights, AWQ smoothing (an input
    division the format has no place for), a group size that does not divide a layer's width.
    """
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    pack_model(handle.model)
    layers = {n: m for n, m in handle.model.named_modules() if isinstance(m, PackedLinear)}
    for name, m in layers.items():
        if m.fmt != "uniform":
            raise ValueError(
                f"compressed-tensors holds integer weights only, and this run stored {name} as NormalFloat "
                f"({m.fmt}); save it as {FORMAT_NAME}, or quantize with uniform weights (weight_format=uniform).")
        if m.smooth is not None:
            raise ValueError(
                f"{name} divides its input by AWQ smoothing scales, which compressed-tensors cannot hold; "
                f"save it as {FORMAT_NAME}, or use a recipe without AWQ.")
        if m.in_features % m.group:
            raise ValueError(f"{name}: group size {m.group} does not divide its width {m.in_features}, which "
                             f"compressed-tensors' group strategy requires; save it as {FORMAT_NAME}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = handle.save_dtype  # floats (scales included) in the checkpoint's own dtype, as llm-compressor writes them
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[tuple[int, int | None, int | None, str], list[str]] = {}
    rotated: list[str] = []
    for name, m in layers.items():
        if m.act is not None and m.act.rotation is not None:  # a rotated integer grid is no integer grid
            tensors[f"{name}.weight"] = in_dtype(effective_weight(m), dtype)
            if m.bias is not None:
                tensors[f"{name}.bias"] = in_dtype(m.bias, dtype)
            rotated.append(name)
            continue
        # a clipped dynamic range has no place in the token scheme (engines take each row's min/max): weight-only
        act_bits = m.act.bits if takes_dynamic_ranges(m.act) and m.act.clip is None else None
        layout = INT_QUANTIZED if m.bits == 8 and act_bits == 8 else PACK_QUANTIZED
        tensors.update(ct_weight_tensors(name, m, layout, dtype))
        if m.bias is not None:
            tensors[f"{name}.bias"] = in_dtype(m.bias, dtype)
        groups.setdefault((m.bits, None if m.group == m.in_features else m.group, act_bits, layout), []).append(name)
    for key, t in unquantized_tensors(handle.model, layers, dtype).items():
        tensors.setdefault(key, t)
    layouts = {key[3] for key in groups}
    qconfig = QuantizationConfig(
        config_groups={
            f"group_{i}": QuantizationScheme(
                targets=names, format=layout,
                weights=QuantizationArgs(num_bits=bits, type="int", symmetric=False,
                                         strategy="channel" if group is None else "group", group_size=group),
                input_activations=None if act_bits is None else QuantizationArgs(
                    num_bits=act_bits, type="int", symmetric=False, strategy="token", dynamic=True))
            for i, ((bits, group, act_bits, layout), names) in enumerate(sorted(groups.items(), key=str))},
        format=layouts.pop() if len(layouts) == 1 else "mixed-precision",
        quantization_status="compressed", ignore=[])
    save_file(unshared({k: v.cpu() for k, v in tensors.items()}), str(out / WEIGHTS), metadata={"format": "pt"})
    compressed = [n for names in groups.values() for n in names]
    language = {n for n, _ in build_layer_map(handle.model).linears("language")}
    before_forward = [n for n in compressed if n not in language]  # run by generate before the decompress hook
    write_model_files(handle, out, {**qconfig.model_dump(exclude_none=True),
                                    **({"dequantize": True} if before_forward else {})})
    write_activation_sidecar(out, handle, layers, config_dict, stats, loader="from_pretrained")
    static = any(m.act is not None and (m.act.calibrated or m.act.clip is not None) for m in layers.values())
    dynamic = sum(len(names) for (_, _, act_bits, _), names in groups.items() if act_bits is not None)
    paragraphs = [
        f"{handle.name} quantized by Q-VLM Studio, written as a compressed-tensors checkpoint "
        f"(`{qconfig.format}`: {len(layers) - len(rotated)} Linear layers with integer weights; the rest stay in "
        "floating point).",
        "Load it with plain transformers (with the `compressed-tensors` package); `generate` works under "
        "`torch.no_grad()` and `torch.inference_mode()`:",
        load_snippet(out.name),
        (f"The config asks the loader to decompress the weights while loading (`\"dequantize\": true`): "
         f"{len(before_forward)} of the compressed Linears are in the vision tower or the projector, which "
         "transformers' `generate` runs before the model's first forward call, where compressed-tensors 0.20 "
         "decompresses a compressed model, so left compressed they would run on their codes."
         if before_forward else
         "After loading, the Linears hold the compressed codes; compressed-tensors 0.20 has no kernel that "
         "multiplies by them and decompresses every Linear to floating point on the model's first forward call. "
         "`from_pretrained(..., quantization_config=CompressedTensorsConfig(dequantize=True))` decompresses while "
         "loading instead. The weights are the same either way."),
        (f"Activations: {dynamic} layers declare dynamic per-token "
         f"int{'/'.join(str(b) for b in sorted({k[2] for k in groups if k[2]}))} inputs (`input_activations`: "
         "strategy `token`, `dynamic: true`, asymmetric), the scheme serving engines run on integer kernels; "
         "plain transformers applies the weights only (a decompressing load drops the activation scheme)."
         if dynamic else "The loader applies the weights only: a W4A4 variant answers as its W4A16 counterpart.")
        + (f" The run's static activation ranges are in `{ACTIVATION_SIDECAR}`." if static else "")]
    if rotated:
        paragraphs.append(rotated_tower_note(rotated, tensors, dtype))
    write_readme(out, f"{handle.name}: compressed-tensors", paragraphs)
    return out


PACK_QUANTIZED = "pack-quantized"
INT_QUANTIZED = "int-quantized"
"""compressed-tensors' two integer layouts: codes packed into int32 (any bits, what its weight-only loaders read),
and one int8 per weight (the W8A8 layout llm-compressor writes and serving engines' int8 kernels read)."""


def ct_weight_tensors(name: str, m: PackedLinear, layout: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one packed uniform Linear in ``layout``: signed codes q - 2^(b-1) and
    signed zero points, so (q - zp) * scale is the project's weight (up to the scale's rounding to ``dtype``).

    ``pack-quantized`` packs the zero points along the rows, zero-padded to [out, groups] int32: the shape
    transformers 5.24 + compressed-tensors 0.20 allocate when loading (their load path leaves the zero point
    unpacked, then unpacks the first out / (32 / b) rows on decompression).
    """
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    shape = (m.out_features, m.in_features)
    half = 1 << (m.bits - 1)
    codes = (unpack_bits(m.code_stream(), m.bits, shape[0] * shape[1]).reshape(shape) - half).to(torch.int8)
    zero = (m.zero.to(torch.int32) - half).to(torch.int8)
    scale = in_dtype(m.scale, dtype)
    if layout == INT_QUANTIZED:
        return {f"{name}.weight": codes, f"{name}.weight_scale": scale, f"{name}.weight_zero_point": zero}
    packed_zero = pack_to_int32(zero, m.bits, packed_dim=0)
    return {f"{name}.weight_packed": pack_to_int32(codes, m.bits), f"{name}.weight_scale": scale,
            f"{name}.weight_zero_point": F.pad(packed_zero, (0, 0, 0, m.zero.shape[0] - packed_zero.shape[0])),
            f"{name}.weight_shape": torch.tensor(shape)}


def _read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise ExportError(f"{shown_path(folder)} is not a Q-VLM export: {MANIFEST} is missing.")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(f"{shown_path(path)} is corrupted ({without_paths(err, folder)}).") from err
    if manifest.get("format") != FORMAT_NAME:
        raise ExportError(f"{shown_path(folder)} holds format {manifest.get('format')!r}, not {FORMAT_NAME!r}.")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise ExportError(
            f"{shown_path(folder)} was written with export format version {manifest.get('format_version')}; this version of "
            f"Q-VLM Studio reads versions {', '.join(map(str, READABLE_VERSIONS))}. Re-export it with a matching "
            "version."
        )
    return manifest


def load_model(name_or_path: str | Path, **kwargs: Any) -> VLMHandle:
    """Load whatever the CLI or the app's model picker is given: a Q-VLM packed export folder
    (:func:`load_quantized`) or a checkpoint (bundled, local folder, hub id: :func:`qvlm.models.load_vlm`).

    Why here and not in ``load_vlm``: reading the packed format needs the quantized layer classes,
    and :mod:`qvlm.models` sits below :mod:`qvlm.quant`. ``kwargs`` are ``load_vlm``'s; an export
    uses ``device`` and checks ``allowed_roots`` (its dtype is the one it was saved in).
    """
    location, source = resolve_source(name_or_path, kwargs.get("allowed_roots"))
    if source != "hub" and is_packed_export(location):
        return load_quantized(location, device=kwargs.get("device"))
    return load_vlm(name_or_path, **kwargs)


def load_quantized(folder: str | Path, device: str | torch.device | None = None) -> VLMHandle:
    """Rebuild a packed quantized model from an export folder; raises :class:`ExportError` when unreadable.

    ``device`` None: :func:`~qvlm.models.device.resolve_device` (``$QVLM_DEVICE``, else CUDA when available).
    The layers whose formats factor run on integer kernels (:func:`~qvlm.quant.integer.use_integer_kernels`:
    the handle's ``execution_path`` says which path answers, ``simulated_layers`` why the others stay).
    """
    from transformers import AutoConfig, AutoProcessor

    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"No export folder at {shown_path(folder)}.")
    manifest = _read_manifest(folder)
    try:
        tensors = load_file(str(folder / WEIGHTS))
    except (SafetensorError, FileNotFoundError, OSError) as err:
        raise ExportError(f"{shown_path(folder / WEIGHTS)} is missing or corrupted ({without_paths(err, folder)}).") from err
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ExportError(f"{shown_path(folder)}: config or processor files are missing or unreadable ({without_paths(err, folder)}).") from err
    dtype = getattr(torch, manifest.get("dtype", "float32"))
    cls = model_classes().get(config.model_type)
    if cls is None:
        raise ExportError(f"{shown_path(folder)}: unsupported model type {config.model_type!r}.")
    with torch.device("meta"):
        model = cls(config)
    model.to(dtype)
    try:
        for name, entry in manifest["modules"].items():
            replace_module(model, name, _packed_from(name, entry, tensors, dtype))
        # the packed layers already hold their tensors (normalised to this version's layout)
        packed = set(manifest["modules"])
        model.load_state_dict(  # floats stored in the checkpoint's dtype compute in the saved run's
            {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()
             if k in model.state_dict() and k.rsplit(".", 1)[0] not in packed},
            strict=False, assign=True,
        )
        model.tie_weights()  # assign=True gave tied weights (embeddings / lm_head) separate copies
    except KeyError as err:
        raise ExportError(f"{shown_path(folder)}: the export is partial, tensor {err} is missing.") from err
    except ValueError as err:  # an entry this version cannot build (unknown weight format, bad shape)
        raise ExportError(f"{shown_path(folder)}: unreadable layer entry ({without_paths(err, folder)}).") from err
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise ExportError(f"{shown_path(folder)}: the export is partial ({len(still_meta)} tensors missing, e.g. {still_meta[0]}).")
    _materialize_buffers(model)
    model.to(resolve_device(device)).eval()
    model.requires_grad_(False)
    model.generation_config = _generation_config(folder, model)
    task = recorded_task(folder)
    storage = getattr(torch, manifest.get("storage_dtype", ""), None)
    handle = VLMHandle(model=model, processor=processor, layer_map=build_layer_map(model),
                       name=f"export: {folder.name}", source="local", task=task or DEFAULT_TASK,
                       task_recorded=task is not None, checkpoint_dtype=storage if isinstance(storage, torch.dtype) else None)
    use_integer_kernels(handle)
    return handle


def _packed_from(name: str, entry: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> PackedLinear:
    """The PackedLinear of manifest ``entry`` from its stored tensors (version 1 or 2)."""
    act = None
    if entry.get("act"):
        act = ActQuantizer(entry["act"]["bits"], entry["act"]["granularity"])
        if not act.dynamic:
            act.set_range(tensors[f"{name}.act.lo"], tensors[f"{name}.act.hi"])
        elif entry["act"].get("clip") is not None:
            act.set_clip(entry["act"]["clip"])
        if entry["act"].get("rotated"):
            act.set_rotation(tensors[entry["act"].get("rotation_key", f"{name}.act.rotation")])
    fmt = LEGACY_FORMAT_NAMES.get(entry["format"], entry["format"])
    return PackedLinear(
        tensors[f"{name}.packed"], fmt, entry["bits"], tuple(entry["shape"]), entry["group"],
        tensors[f"{name}.scale"], tensors.get(f"{name}.zero"),
        tensors[f"{name}.bias"].to(dtype) if entry.get("bias") else None, act,
        tensors[f"{name}.smooth"] if entry.get("smooth") else None, dtype,
        entry.get("tower", ""), entry.get("role", ""),
    )


def _materialize_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (rotary ``inv_freq``, CLIP ``position_ids``) are not in the state dict:
    rebuild each owning module from its config on the CPU and take its buffers."""
    for module in model.modules():
        meta = [n for n, b in module.named_buffers(recurse=False) if b is not None and b.is_meta]
        if not meta:
            continue
        config = getattr(module, "config", None)
        if config is None:
            raise ExportError(f"cannot rebuild buffers {meta} of {type(module).__name__}")
        fresh = type(module)(config)
        for n in meta:
            setattr(module, n, getattr(fresh, n))


def _generation_config(folder: Path, model: nn.Module):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(folder)
    except OSError:
        return GenerationConfig.from_model_config(model.config)
