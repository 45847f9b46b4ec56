"""Checking `train`'s arguments before Hydra runs: the config is composed once per value of every
sweep, so a typo, an unknown name or a value of the wrong type gets one line naming the problem and
the valid choices instead of Hydra's multi-line report, and `-m a=x,y` fails before any job starts.
"""
from __future__ import annotations

import difflib
from typing import Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType, ValueType
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf

from transfer_cli.config_checks import check_values
from transfer_cli.config_files import CONFIG_DIR, config_options
from transfer_cli.errors import TransferCliError

HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-path", "-cp",
                          "--config-dir", "-cd", "--info", "-i", "--experimental-rerun"}


def overrides_only(args: list[str]) -> list[str]:
    """Drop Hydra's own flags (`-m`, `--cfg job`, ...) and keep the KEY=VALUE overrides."""
    overrides, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in HYDRA_FLAGS_WITH_VALUE
        else:
            overrides.append(arg)
    return overrides


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """The config `train` would run with these overrides, or a TransferCliError saying what is wrong."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose("train", overrides=list(overrides))
    except MissingConfigException as err:
        raise TransferCliError(_explain_missing(err)) from None
    except HydraException as err:
        raise TransferCliError(_explain_override(err, overrides)) from None


def check_overrides(overrides: Sequence[str]) -> None:
    """Compose every value of every sweep once, checking its types and values (config_checks), so
    `-m a=x,y` fails before any job starts."""
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as err:
        raise TransferCliError(f"cannot parse the overrides: {str(err).splitlines()[0]}") from None
    if all(_picks_an_existing_option(o) for o in parsed):
        return  # nothing a composition could reject: `train` and `train trainer=smoke` start without one
    base = [o.input_line for o in parsed if not o.is_sweep_override()]
    sweeps = [o for o in parsed if o.is_sweep_override()]
    firsts = {o.input_line: f"{o.get_key_element()}={_sweep_values(o)[0]}" for o in sweeps}
    first = compose_config(base + list(firsts.values()))
    check_value_types(first, compose_config([]))
    check_values(first)
    for sweep in sweeps:
        others = [v for k, v in firsts.items() if k != sweep.input_line]
        for value in _sweep_values(sweep)[1:]:
            check_values(compose_config(base + others + [f"{sweep.get_key_element()}={value}"]))


def _sweep_values(sweep: Override) -> list[str]:
    """The values a sweep override takes; an interval (an Optuna search range) by its two ends."""
    if sweep.value_type == ValueType.INTERVAL_SWEEP:
        return [str(sweep.value().start), str(sweep.value().end)]
    return list(sweep.sweep_string_iterator())


def _picks_an_existing_option(override: Override) -> bool:
    """`group=name` where configs/<group>/<name>.yaml exists (trainer=smoke, experiment=paper/x)."""
    value = override.value()
    return (override.type == OverrideType.CHANGE and override.package is None and isinstance(value, str)
            and (CONFIG_DIR / override.key_or_group / f"{value}.yaml").is_file())


def check_value_types(cfg: DictConfig, defaults: DictConfig) -> None:
    """A value whose default is a number or a boolean must stay one (YAML configs carry no schema)."""
    _check_types(OmegaConf.to_container(cfg, resolve=False), OmegaConf.to_container(defaults, resolve=False), "")


def _check_types(values: dict, defaults: dict, prefix: str) -> None:
    for key, default in defaults.items():
        if key not in values or values[key] is None or default is None:
            continue
        value, path = values[key], f"{prefix}{key}"
        if isinstance(default, dict) and isinstance(value, dict):
            _check_types(value, default, f"{path}.")
        elif isinstance(default, bool) and not isinstance(value, bool):
            raise TransferCliError(f"{path}={value!r} must be true or false")
        elif isinstance(default, (int, float)) and not isinstance(default, bool) and (
                isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TransferCliError(f"{path}={value!r} must be a number (default {default})")


def _explain_missing(err: MissingConfigException) -> str:
    first = str(err).splitlines()[0]
    if "Could not find '" in first:
        group, _, name = first.split("Could not find '")[1].rstrip("'").rpartition("/")
        if group:
            options = ", ".join(config_options(group))
            return f"unknown {group} {name!r}; choose one of: {options}"
    return first


def _explain_override(err: HydraException, overrides: Sequence[str]) -> str:
    first = str(err).splitlines()[0]
    if first.startswith("Could not override '"):
        key = first.split("'")[1]
        hint = _closest_key(key)
        suffix = f" (did you mean {hint}?)" if hint else ""
        return f"unknown config key {key!r}{suffix}; `transfer-cli train --cfg job` shows every key"
    return first


def _closest_key(key: str) -> str | None:
    parent, _, leaf = key.rpartition(".")
    try:
        node = compose_config([])
        node = OmegaConf.select(node, parent) if parent else node
    except TransferCliError:
        return None
    if not isinstance(node, DictConfig):
        return None
    match = difflib.get_close_matches(leaf, [str(k) for k in node.keys()], n=1)
    return f"{parent}.{match[0]}" if match and parent else (match[0] if match else None)

