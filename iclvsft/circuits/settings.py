"""What decides a circuits folder's results, and the check that a finished folder was made with them:
one comparison for reproduce.py (which reuses a finished folder only with the same settings) and
analyze_circuits.py (which refuses to replace one made with other settings unless --overwrite)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import ConfigError
from ..runs import differences, summarise_differences

CONFIG_FILE = "config.json"


def circuit_settings(config: dict, derived_adapter: bool) -> dict[str, Any]:
    """What decides a circuits folder's results: the model and its precision, the data seed, the circuits
    section (its FT folder only when the user named one: a derived one is a study run, checked as such)."""
    circuits = {k: v for k, v in config["circuits"].items() if not (k == "adapter" and derived_adapter)}
    return {"model": config["model"], "dtype": config["dtype"], "attn_implementation": config["attn_implementation"],
            "data_seed": config["data"]["seed"], "demo_split": config["eval"]["demo_split"], "circuits": circuits}


def check_circuit_settings(out: Path, config: Config, derived_adapter: bool,
                           remedies: tuple[str, ...] = ("move_folder", "another_results")) -> None:
    """A finished circuits folder ``out`` was made with ``config``'s settings; else one line with the
    differences and ``remedies`` (keys of :data:`iclvsft.errors.REMEDIES`)."""
    try:
        saved = json.loads((Path(out) / CONFIG_FILE).read_text()).get("config") if (Path(out) / CONFIG_FILE).is_file() \
            else None
        saved_settings = circuit_settings(saved, derived_adapter) if saved else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"{Path(out) / CONFIG_FILE} is unreadable", *remedies) from None
    diff = differences(saved_settings, circuit_settings(config.to_dict(), derived_adapter))
    if diff:
        raise ConfigError(f"holds circuit results made with other settings ({summarise_differences(diff)})",
                          *remedies, out=out)
