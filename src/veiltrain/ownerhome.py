"""The owner's private folder in deployment mode: run settings that flows reach by reference.

The Prefect server is readable by every worker, so flow parameters carry only a run id or a
profile name; the settings themselves (data location, seed, ...) stay in 0600 files here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from veiltrain.config import RunConfig, load_config
from veiltrain.errors import ConfigError

HOME_VARIABLE = "VEILTRAIN_OWNER_HOME"
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
# Set per run by the owner: a profile that fixed them would make every scheduled run collide.
_PER_RUN = ("run_id", "out", "owner_store")


def home() -> Path:
    """The owner's folder, from the owner worker's environment (set by `veiltrain stack up`)."""
    value = os.environ.get(HOME_VARIABLE)
    if not value:
        raise ConfigError(
            f"{HOME_VARIABLE} is not set: owner stages run only on the owner's pool, whose "
            "worker `veiltrain stack up` starts with it"
        )
    return Path(value)


def _name(kind: str, name: str) -> str:
    if not name or not set(name) <= _NAME_CHARS or name.startswith("."):
        raise ConfigError(f"{kind} {name!r}: letters, digits, '_', '.', '-' only")
    return name


def _write_private(path: Path, value: dict[str, Any]) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(value, out, indent=2, sort_keys=True)
    tmp.replace(path)


def _read(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what}: {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{what}: {path} is unreadable ({exc})") from exc
    if not isinstance(value, dict):
        raise ConfigError(f"{what}: {path} must hold a JSON object")
    return value


def run_config_path(run_id: str, root: Path | None = None) -> Path:
    """Where one run's settings live."""
    return (root or home()) / "runs" / _name("run id", run_id) / "config.json"


def for_run(options: dict[str, Any], run_id: str, root: Path) -> RunConfig:
    """A run's full settings: the options plus its own output folder under the owner's home."""
    fixed = {k: v for k, v in options.items() if k not in _PER_RUN}
    out = root / "runs" / _name("run id", run_id)
    return load_config(**fixed, run_id=run_id, out=str(out)).resolved()


def save_run(cfg: RunConfig, root: Path | None = None) -> Path:
    """Keep a run's settings for the owner stages; a run id keeps its first settings."""
    path = run_config_path(cfg.run_id, root)
    value = cfg.model_dump(mode="json")
    if path.is_file() and _read(path, f"run {cfg.run_id}") != value:
        raise ConfigError(
            f"run {cfg.run_id} already exists with other settings ({path}); use a new run id"
        )
    _write_private(path, value)
    return path


def load_run(run_id: str, root: Path | None = None) -> RunConfig:
    """A run's settings, saved by `veiltrain run --deployed` or by a scheduled pipeline run."""
    return load_config(**_read(run_config_path(run_id, root), f"run {run_id}"))


def profile_path(name: str, root: Path | None = None) -> Path:
    """Where a named set of run options lives (scheduled runs use one)."""
    return (root or home()) / "profiles" / f"{_name('profile', name)}.json"


def save_profile(name: str, options: dict[str, Any], root: Path | None = None) -> Path:
    """Validate options as a run would, then keep them under a name."""
    load_config(**{k: v for k, v in options.items() if k not in _PER_RUN})
    path = profile_path(name, root)
    _write_private(path, {k: v for k, v in options.items() if k not in _PER_RUN})
    return path


def load_profile(name: str, root: Path | None = None) -> dict[str, Any]:
    """A named set of run options."""
    return _read(profile_path(name, root), f"profile {name!r} (`veiltrain profile {name} ...`)")
