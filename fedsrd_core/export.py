"""Exporting the global LoRA state as a standard peft adapter, without loading the base model.

A peft adapter directory holds ``adapter_config.json`` (a serialised ``LoraConfig``) and
``adapter_model.safetensors`` with, for every adapted module, the tensors
``base_model.model.<module>.lora_A.weight`` (``r x d_in``) and ``...lora_B.weight``
(``d_out x r``): exactly the factors of :class:`~fedsrd_core.state.GlobalState` under peft's
names (see :mod:`fedsrd_core.peft_lora`); the routed experts of a fused expert weight are
stacked back into the one pair of tensors peft holds for it.
``PeftModel.from_pretrained(base_model, directory)`` loads it onto the base model, and
``AutoPeftModelForCausalLM.from_pretrained(directory)`` loads the base model named by
``base_model_name_or_path`` (a local directory, written as an absolute path, or a hub id).

The adapter's layout is a function of the base model's *architecture* only, so
:func:`adapter_layout_for` builds the model on PyTorch's ``meta`` device (shapes, no storage)
from its config: it needs neither the weight files nor the memory to hold them. The export
does the same to write what peft needs to know about the architecture (``fan_in_fan_out`` for
GPT-2's ``Conv1D`` layers, where each fused expert weight's factors go).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Final

import torch
from peft import LoraConfig
from safetensors.torch import save as safetensors_save
from transformers import AutoModelForCausalLM, PreTrainedModel

from fedsrd_core.modeling.loading import ModelLoadError, _load_config, _locate
from fedsrd_core.peft_lora import (
    ALL_LINEAR,
    EXPERT_SLOT,
    PEFT_PREFIX,
    LoraSettingError,
    LoraSlot,
    adapter_layout,
    attach_lora,
    lora_config,
    lora_slots,
    resolve_lora_config,
)
from fedsrd_core.state import GlobalState

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "adapter_layout_for",
    "adapter_zip",
    "write_peft_adapter",
]

#: File names peft reads from an adapter directory.
ADAPTER_CONFIG_FILE: Final = "adapter_config.json"
ADAPTER_WEIGHTS_FILE: Final = "adapter_model.safetensors"

_ALL_LINEAR: Final = ALL_LINEAR

#: Timestamp of every zip entry (the earliest a zip can store), for reproducible archives.
_ZIP_DATE_TIME: Final = (1980, 1, 1, 0, 0, 0)


# ---------------------------------------------------------------------------------------------
# Layout


def adapter_layout_for(
    name_or_path: str,
    *,
    rank: int,
    target_modules: str | list[str] = _ALL_LINEAR,
    dropout: float = 0.0,
    allow_download: bool = False,
) -> dict[str, tuple[int, int]]:
    """The LoRA layout (``module -> (d_out, d_in)``) of a causal LM, without its weights.

    Reads only the model's config (offline unless ``allow_download``), instantiates the model on
    the ``meta`` device, where tensors have shapes but no storage, and attaches LoRA with
    :func:`~fedsrd_core.peft_lora.lora_config`. The result equals
    :func:`~fedsrd_core.peft_lora.adapter_layout` of the loaded model with LoRA attached the same
    way, and takes well under a second of work and no weight memory even for a multi-billion
    parameter model.

    Args:
        name_or_path: a local model directory or a hub id (resolved as by
            :func:`~fedsrd_core.modeling.load_causal_lm`; cached models load offline).
        rank: the LoRA rank (it does not change the layout, but is validated).
        target_modules: peft's ``target_modules``: ``"all-linear"``, a list of module name
            suffixes, or a regular expression matched against full module names (see
            :func:`~fedsrd_core.peft_lora.resolve_lora_config`; routed experts included).
        dropout: the LoRA dropout (validated: routed experts take none).
        allow_download: allow fetching the config from the Hugging Face Hub.

    Raises:
        ModelLoadError: the model cannot be found, its config does not load, it is not a causal
            LM, or it cannot be instantiated from its config. The message names the model.
        ValueError: ``rank`` or ``dropout`` is invalid, or ``target_modules`` matches no
            supported layer of the model.
    """
    config = lora_config(rank=rank, dropout=dropout, target_modules=target_modules)
    peft_model = _meta_peft_model(name_or_path, config, allow_download)
    try:
        return adapter_layout(peft_model)
    except ValueError as e:  # pragma: no cover - peft raises first when nothing matches
        raise ValueError(
            f"target_modules={target_modules!r} adapts no layer of {name_or_path!r}"
        ) from e


def _meta_model(name_or_path: str, *, allow_download: bool) -> PreTrainedModel:
    """The model of ``name_or_path`` built from its config on the ``meta`` device."""
    location = _locate(name_or_path, allow_download)
    model_config = _load_config(name_or_path, location, allow_download)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config)  # type: ignore[no-untyped-call]
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, ImportError) as e:
        raise ModelLoadError(
            f"cannot build {name_or_path!r} ({type(model_config).__name__}) from its config: {e}",
            reason=f"it cannot be built from its config ({type(model_config).__name__})",
        ) from e
    if not isinstance(model, PreTrainedModel):  # pragma: no cover - transformers' contract
        raise ModelLoadError(f"{name_or_path!r} did not build as a PreTrainedModel")
    return model


def _meta_peft_model(name_or_path: str, config: LoraConfig, allow_download: bool) -> Any:
    """The model of ``name_or_path`` built on the ``meta`` device, LoRA attached."""
    model = _meta_model(name_or_path, allow_download=allow_download)
    try:
        return attach_lora(model, config)
    except ValueError as e:
        message = (
            f"cannot attach LoRA with target_modules={config.target_modules!r} to "
            f"{name_or_path!r}: {e}"
        )
        if isinstance(e, LoraSettingError):
            raise LoraSettingError(e.setting, message) from e
        raise ValueError(message) from e


# ---------------------------------------------------------------------------------------------
# Adapter files


def _json_ready(value: Any) -> Any:
    """``value`` with sets turned into sorted lists (peft writes sets in hash order)."""
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    return value


def _targets(module: str, target_modules: str | list[str]) -> bool:
    """Whether peft would adapt ``module`` given ``target_modules`` (``"all-linear"``: yes).

    Mirrors peft's matching: a string other than the shorthand is a regular expression that
    must match the whole module name; a list entry matches the name or a dotted suffix of it.
    A routed expert (``<weight>[<expert>]``) is selected when its fused weight is.
    """
    slot = EXPERT_SLOT.match(module)
    if slot is not None:
        module = slot.group("param")
    if isinstance(target_modules, str):
        return target_modules == _ALL_LINEAR or re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith(f".{t}") for t in target_modules)


def _validate_state(state: GlobalState, rank: int, target_modules: str | list[str]) -> None:
    if len(state) == 0:
        raise ValueError("the global state has no modules: there is no adapter to export")
    for name, f in state.items():
        if name.startswith(PEFT_PREFIX):
            raise ValueError(
                f"module name {name!r} already carries peft's prefix {PEFT_PREFIX!r}; global "
                "state names are the base model's module paths"
            )
        if f.rank != rank:
            raise ValueError(f"{name}: the factors have rank {f.rank}, but rank={rank} was given")
        if not _targets(name, target_modules):
            raise ValueError(
                f"module {name!r} is not selected by target_modules={target_modules!r}: peft "
                "would not load its factors"
            )
        for which, t in (("A", f.A), ("B", f.B)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}: factor {which} has non-finite values")


def _base_model_reference(base_model: str) -> str:
    """What ``base_model_name_or_path`` says: a local directory as an absolute path (so
    ``AutoPeftModelForCausalLM`` finds it from any working directory), a hub id as it is."""
    path = Path(base_model)
    return str(path.resolve()) if path.is_dir() else base_model


def _peft_tensors(state: GlobalState, slots: dict[str, LoraSlot]) -> dict[str, torch.Tensor]:
    """The state's factors under peft's tensor names; the routed experts of one fused weight
    stacked as peft holds them (see :mod:`fedsrd_core.peft_lora`)."""
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, list[tuple[int, str]]] = {}
    for name, slot in slots.items():
        if slot.expert is None:
            f = state[name]
            parts = {"A": f.A, "B": f.B}
        else:
            groups.setdefault(slot.module, []).append((slot.expert, name))
            continue
        for which, t in parts.items():
            # clone(): each tensor gets its own compact storage, as safetensors requires (the
            # factors could be views into one buffer).
            data = t.detach().to("cpu", torch.float32).contiguous().clone()
            tensors[f"{PEFT_PREFIX}{name}.lora_{which}.weight"] = data
    for module, members in groups.items():
        names = [n for _, n in sorted(members)]
        A = torch.cat([state[n].A.detach().to("cpu", torch.float32) for n in names], dim=0)
        B = torch.stack([state[n].B.detach().to("cpu", torch.float32) for n in names], dim=-1)
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = A.contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = B.reshape(B.shape[0], -1).contiguous()
    return tensors


def _adapter_files(
    state: GlobalState,
    *,
    base_model: str,
    rank: int,
    alpha: int | None,
    dropout: float,
    target_modules: str | list[str],
) -> dict[str, bytes]:
    """``{file name: contents}`` of the adapter directory, in sorted name order."""
    config: LoraConfig = lora_config(
        rank=rank, alpha=alpha, dropout=dropout, target_modules=target_modules
    )
    _validate_state(state, rank, target_modules)
    # The architecture (config only, on the meta device) says what the state's names alone
    # cannot: whether the layers are GPT-2's Conv1D, and where peft keeps each fused expert
    # weight's factors.
    model = _meta_model(base_model, allow_download=False)
    resolved = resolve_lora_config(model, config)
    peft_model = attach_lora(model, config)
    slots = lora_slots(peft_model)
    layout = adapter_layout(peft_model)
    shapes = {name: (int(f.B.shape[0]), int(f.A.shape[1])) for name, f in state.items()}
    if layout != shapes:
        differ = sorted(set(layout).symmetric_difference(shapes)) or sorted(
            n for n in layout if layout[n] != shapes[n]
        )
        raise ValueError(
            f"the global state does not fit the adapter of {base_model!r} with "
            f"target_modules={target_modules!r}: first difference at {differ[0]!r}"
        )
    if resolved.target_parameters:
        # Explicit names: "all-linear" would be re-read by peft, which for some MoE models
        # targets the routers too and fuses ranks (see peft_lora.resolve_lora_config).
        config.target_modules = list(resolved.target_modules or [])
        config.target_parameters = list(resolved.target_parameters)
    config.fan_in_fan_out = resolved.fan_in_fan_out
    config.base_model_name_or_path = _base_model_reference(base_model)
    config.inference_mode = True  # as peft's own save_pretrained writes it
    config_dict = _json_ready(config.to_dict())  # type: ignore[no-untyped-call]
    config_bytes = (json.dumps(config_dict, indent=2, sort_keys=True) + "\n").encode("utf-8")
    weights = safetensors_save(_peft_tensors(state, slots), metadata={"format": "pt"})
    return {ADAPTER_CONFIG_FILE: config_bytes, ADAPTER_WEIGHTS_FILE: weights}


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):  # directories cannot be opened for fsync on Windows
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_peft_adapter(
    state: GlobalState,
    directory: str | Path,
    *,
    base_model: str,
    rank: int,
    alpha: int | None = None,
    dropout: float = 0.0,
    target_modules: str | list[str] = _ALL_LINEAR,
) -> Path:
    """Write ``state`` as a peft LoRA adapter directory; returns ``Path(directory)``.

    The directory gets :data:`ADAPTER_CONFIG_FILE` (the ``LoraConfig`` of
    :func:`~fedsrd_core.peft_lora.lora_config` with ``base_model_name_or_path=base_model``,
    absolute for a local directory, and the architecture's ``fan_in_fan_out``; for a model
    with routed experts, explicit ``target_modules`` and ``target_parameters``) and
    :data:`ADAPTER_WEIGHTS_FILE` (float32 factors under peft's names), so
    ``PeftModel.from_pretrained(<base model>, directory)`` and
    ``AutoPeftModelForCausalLM.from_pretrained(directory)`` reproduce the model the state
    trains. The base model's config is read (offline) and the model built on the ``meta``
    device, its weights are not loaded; the state must be its adapter's layout, and ``rank``,
    ``alpha``, ``dropout`` and ``target_modules`` must be those of the run.

    The files are written into a hidden staging directory next to ``directory``, flushed and
    renamed into place, so ``directory`` either does not exist or is complete. Missing parent
    directories are created.

    Raises:
        FileExistsError: ``directory`` already exists (nothing is written).
        ModelLoadError: ``base_model`` is neither a local directory nor a cached hub model.
        ValueError: the state is empty, a module's rank differs from ``rank``, a module is not
            selected by ``target_modules``, a factor is not finite, the state does not fit
            the base model's adapter, or an option is invalid.
    """
    target = Path(directory)
    if target.exists() or target.is_symlink():
        raise FileExistsError(f"adapter directory {str(target)!r} already exists")
    files = _adapter_files(
        state,
        base_model=base_model,
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        target_modules=target_modules,
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        staging.chmod(0o755)  # mkdtemp's 0700 is for the staging phase only
        for name, data in files.items():
            with (staging / name).open("wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        _fsync_directory(staging)
        # rename() would silently replace an *empty* directory created since the check above.
        if target.exists() or target.is_symlink():
            raise FileExistsError(f"adapter directory {str(target)!r} already exists")
        try:
            os.rename(staging, target)
        except OSError as e:
            if target.exists():  # a non-empty directory appeared: ENOTEMPTY / EEXIST
                raise FileExistsError(f"adapter directory {str(target)!r} already exists") from e
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_directory(target.parent)
    return target


def adapter_zip(
    state: GlobalState,
    *,
    base_model: str,
    rank: int,
    alpha: int | None = None,
    dropout: float = 0.0,
    target_modules: str | list[str] = _ALL_LINEAR,
) -> bytes:
    """The adapter of :func:`write_peft_adapter` as a zip archive (bytes).

    The archive holds :data:`ADAPTER_CONFIG_FILE` and :data:`ADAPTER_WEIGHTS_FILE` at its
    root, so extracting it into an empty directory gives a loadable adapter directory. It is
    reproducible: entries in sorted order, fixed timestamps and permissions, ``ZIP_DEFLATED``;
    the same state and options give the same bytes (with the same zlib and peft versions; the
    config records peft's version).

    Raises:
        ValueError: as :func:`write_peft_adapter`.
    """
    files = _adapter_files(
        state,
        base_model=base_model,
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        target_modules=target_modules,
    )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(files):
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # Unix, whatever the host, so the bytes do not depend on it
            info.external_attr = 0o644 << 16  # a regular file, rw-r--r--
            archive.writestr(info, files[name])
    return buffer.getvalue()
