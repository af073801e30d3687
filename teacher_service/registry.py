"""Loads the configured teachers: each member from its source, once, with its version.

A member loaded by two teachers (same file, same version) is loaded once and shares its cache namespace.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.checkpoint import load_checkpoint
from shared.hashing import file_version
from shared.protocol import MemberInfo, TeacherInfo
from shared.safe_load import first_line, load_export, not_a_model_file, refused_pickle, weights_only_unpickling
from teacher_service.cache.row_formats import namespace_name
from teacher_service.config import ConfigError, MemberConfig, ServiceConfig, TeacherConfig
from teacher_service.ensemble import normalised_weights

log = logging.getLogger("akd.registry")


@dataclass
class Member:
    version: str
    # "checkpoint" | "export" | "robustbench"
    source: str
    path: Path
    model: nn.Module
    arch: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Teacher:
    name: str
    config: TeacherConfig
    members: list[Member]
    # beta, normalised to sum 1
    weights: torch.Tensor

    @property
    def versions(self) -> list[str]:
        return [m.version for m in self.members]

    def info(self) -> TeacherInfo:
        return TeacherInfo(
            name=self.name,
            num_classes=self.config.num_classes,
            input_shape=self.config.input_shape,
            aggregate=self.config.aggregate,
            temperature=self.config.temperature,
            members=[
                MemberInfo(
                    source=m.source,
                    path=str(m.path),
                    weight=float(w),
                    version=m.version,
                    arch=m.arch,
                    metadata=m.metadata,
                )
                for m, w in zip(self.members, self.weights)
            ],
        )


def member_versions(config: ServiceConfig) -> dict[str, list[str]]:
    """Each cache namespace the config serves (a member version, in its teacher's store format), with the
    `teachers.<name>.members[i]` that use it. The weights files are hashed and nothing is loaded: `akd cache` must not
    run a model to tidy a cache. A missing file is a ConfigError."""
    versions: dict[str, list[str]] = {}
    for name, tconf in config.teachers.items():
        for i, mconf in enumerate(tconf.members):
            where = f"teachers.{name}.members[{i}]"
            path = mconf.path if mconf.path is not None else _robustbench_file(mconf)
            if not path.is_file():
                raise ConfigError(f"{where}: weights file {path} does not exist")
            versions.setdefault(namespace_name(file_version(path), tconf.row_format), []).append(where)
    return versions


def load_teachers(config: ServiceConfig, device: torch.device) -> dict[str, Teacher]:
    loaded: dict[str, Member] = {}
    teachers = {}
    for name, tconf in config.teachers.items():
        members = [_load_member(name, i, mconf, tconf, device, loaded) for i, mconf in enumerate(tconf.members)]
        weights = normalised_weights([m.weight for m in tconf.members])
        teachers[name] = Teacher(name, tconf, members, weights)
        log.info("teacher %r: %d member(s), versions %s", name, len(members), ", ".join(m.version for m in members))
    return teachers


def _load_member(
    teacher: str, index: int, mconf: MemberConfig, tconf: TeacherConfig, device: torch.device, loaded: dict[str, Member]
) -> Member:
    where = f"teachers.{teacher}.members[{index}]"
    path = mconf.path if mconf.path is not None else _robustbench_file(mconf)
    problem = not_a_model_file(path)
    if problem is not None:
        if mconf.robustbench is not None and not path.exists():
            raise ConfigError(
                f"{where}: RobustBench weights for {mconf.robustbench!r} are not at {path}; nothing is downloaded, "
                "put the file there"
            )
        raise ConfigError(f"{where}: weights file {path} {problem}")
    version = file_version(path)
    if version not in loaded:
        member = _read_member(where, path, mconf, tconf, version)
        member.model = _prepare(member.model, device)
        loaded[version] = member
    # a shared member must fit every teacher using it
    _check_output(where, loaded[version], tconf, device)
    return loaded[version]


def _read_member(where: str, path: Path, mconf: MemberConfig, tconf: TeacherConfig, version: str) -> Member:
    if mconf.robustbench is not None:
        return Member(version, "robustbench", path, _load_robustbench(where, mconf), arch=mconf.robustbench)
    if path.suffix == ".pt2":
        try:
            return Member(version, "export", path, load_export(path))
        except ValueError as exc:
            # UnsafeFile included
            raise ConfigError(f"{where}: {exc}") from exc
    try:
        ckpt = load_checkpoint(path)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    if ckpt.num_classes != tconf.num_classes or tuple(ckpt.input_shape) != tuple(tconf.input_shape):
        raise ConfigError(
            f"{where}: checkpoint {path} has {ckpt.num_classes} classes and input shape {tuple(ckpt.input_shape)}, "
            f"the teacher expects {tconf.num_classes} classes and input shape {tuple(tconf.input_shape)}"
        )
    try:
        model = ckpt.build()
    except (ValueError, RuntimeError) as exc:
        # unknown architecture, weights that do not fit it
        raise ConfigError(f"{where}: cannot build checkpoint {path}: {exc}") from exc
    return Member(version, "checkpoint", path, model, arch=ckpt.arch, metadata=ckpt.metadata)


def _prepare(model: nn.Module, device: torch.device) -> nn.Module:
    model = model.to(device)
    # exported programs refuse .eval(): export them in eval mode
    if not isinstance(model, torch.fx.GraphModule):
        model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _check_output(where: str, member: Member, tconf: TeacherConfig, device: torch.device) -> None:
    """Fail at start-up, not on the first request, when a member does not fit its teacher."""
    probe = torch.rand(2, *tconf.input_shape, device=device)
    try:
        with torch.inference_mode():
            out = member.model(probe)
    except Exception as exc:
        raise ConfigError(
            f"{where}: {member.path} fails on inputs of shape (2, {', '.join(map(str, tconf.input_shape))}): {exc}"
        ) from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, tconf.num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"{where}: {member.path} returns {got} for 2 inputs, expected logits of shape (2, {tconf.num_classes})"
        )


def _robustbench_file(mconf: MemberConfig) -> Path:
    return mconf.robustbench_dir / mconf.dataset / mconf.threat_model / f"{mconf.robustbench}.pt"


def _load_robustbench(where: str, mconf: MemberConfig) -> nn.Module:
    """Only from weights already on disk: RobustBench downloads missing files, so we check first."""
    try:
        from robustbench.utils import load_model
    except ImportError:
        raise ConfigError(
            f"{where}: robustbench = {mconf.robustbench!r} needs the `robustbench` package installed"
        ) from None
    path = _robustbench_file(mconf)
    # robustbench calls torch.load itself; this makes that load weights-only
    with weights_only_unpickling():
        try:
            return load_model(
                model_name=mconf.robustbench,
                model_dir=str(mconf.robustbench_dir),
                dataset=mconf.dataset,
                threat_model=mconf.threat_model,
            )
        except pickle.UnpicklingError as exc:
            raise ConfigError(f"{where}: {refused_pickle(path, exc)}") from exc
        except (RuntimeError, ValueError, KeyError, OSError) as exc:
            raise ConfigError(f"{where}: RobustBench could not load {path}: {first_line(exc)}") from exc
