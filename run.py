"""sae-vision entry point: `python run.py stage=<cache|train|evaluate|report> layer=<name> ...`.

It only composes the config, validates it, opens the tracker and calls the stage's `run(cfg)`.
"""

from __future__ import annotations

import difflib
import errno
import importlib
import os
import re
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from sae_vision.core import (
    Config,
    check_config,
    file_in_the_way,
    register_configs,
    to_plain,
    unused_overrides,
)

register_configs()

# The package that owns each stage; it exports the stage as `run_<stage>`.
STAGE_PACKAGES = {"cache": "activations", "train": "sae", "evaluate": "evaluate", "report": "report"}
# Errors a user can fix from the command line: print the message, not a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)
# Whether the user asked for Hydra's full tracebacks (run.py sets the variable itself while Hydra
# composes the config, so that composition errors reach composition_error).
USER_FULL_ERROR = os.environ.get("HYDRA_FULL_ERROR")
# The type names in omegaconf's conversion errors, as a user would write them.
TYPE_WORDS = {"Float": "a number", "Integer": "an integer", "Boolean": "true or false"}
# OS errors that mean "this folder cannot be written": read-only, no permission, disk full.
WRITE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)


def fail(message: str) -> None:
    """One `error:` line and exit code 2; a traceback only with HYDRA_FULL_ERROR=1."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(dcfg: DictConfig):
    """Compose, validate, open the tracker, run one stage."""
    from hydra.core.hydra_config import HydraConfig

    from sae_vision.activations import CacheError
    from sae_vision.core import open_tracker, progress
    from sae_vision.sae import RunLocked, TrainingDiverged

    _restore_full_error()
    cfg: Config = OmegaConf.to_object(dcfg)
    try:
        if cfg.data.name == "imagefolder":
            from sae_vision.activations import resolve_data_root

            cfg.data.root = resolve_data_root(cfg.data.root)
        check_config(cfg)
        progress.configure(cfg.logger.progress_every_s)
        overrides = list(HydraConfig.get().overrides.task)
        ignored = unused_overrides(cfg.stage.name, overrides)
        if ignored:
            print(f"warning: stage={cfg.stage.name} does not use {' '.join(ignored)}; these "
                  "overrides have no effect here", file=sys.stderr)
        package = importlib.import_module(f"sae_vision.{STAGE_PACKAGES[cfg.stage.name]}")
        run_stage = getattr(package, f"run_{cfg.stage.name}")
        out_dir = HydraConfig.get().runtime.output_dir
        with open_tracker(cfg.logger, out_dir, to_plain(cfg), job_type=cfg.stage.name) as tracker:
            # train and evaluate print (or act on) the command line's overrides; Hydra stays here.
            extra = {"overrides": overrides} if cfg.stage.name in ("train", "evaluate") else {}
            result = run_stage(cfg, tracker, **extra)
    except (*USER_ERRORS, CacheError, RunLocked, TrainingDiverged) as e:
        fail(str(e))
    except OSError as e:
        in_the_way = e.errno in (errno.ENOTDIR, errno.EEXIST) and file_in_the_way(e.filename)
        if in_the_way:
            fail(f"cannot create {e.filename}: {in_the_way}; move it away or point paths.root "
                 "elsewhere")
        if e.errno not in WRITE_ERRNOS:
            raise
        fail(f"cannot write {e.filename or 'a file'}: {e.strerror}; make it writable (or free "
             "space), or point paths.root elsewhere")
    return result


def _restore_full_error() -> None:
    """Put HYDRA_FULL_ERROR back as the user had it, once Hydra has composed the config."""
    if USER_FULL_ERROR is None:
        os.environ.pop("HYDRA_FULL_ERROR", None)
    else:
        os.environ["HYDRA_FULL_ERROR"] = USER_FULL_ERROR


def composition_error(err: Exception) -> str:
    """One line for an error Hydra raised while composing the config, naming the valid choices."""
    options = getattr(err, "options", None)
    missing = getattr(err, "missing_cfg_file", None)
    if options and missing and "/" in str(missing):
        group, _, value = str(missing).rpartition("/")
        close = difflib.get_close_matches(value, options, n=1)
        hint = f" (did you mean {group}={close[0]}?)" if close else ""
        return (f"{group}={value} is not a choice for {group}{hint}; the choices are: "
                f"{', '.join(options)}")
    cause = err.__cause__
    key, value = getattr(cause, "full_key", None), getattr(cause, "value", None)
    if key:
        found = re.search(r"converted to (\w+)", str(getattr(cause, "msg", "")))
        want = TYPE_WORDS.get(found.group(1), found.group(1)) if found else "another value"
        node = Config()
        for part in str(key).split("."):
            node = getattr(node, part, None)
        example = f", such as its default {key}={node}" if node is not None else ""
        return f"{key}={value} is not valid: {key} takes {want}{example}"
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (f"cannot compose the config: {first}; see `python run.py --help` and "
            "https://hydra.cc/docs/advanced/override_grammar/basic")


def _quote_run_globs(argv: list[str]) -> list[str]:
    """`sae.run=glob(...)` selects SAE runs, not a Hydra sweep: hand it to Hydra as a string."""
    out = []
    for a in argv:
        key, sep, value = a.partition("=")
        if sep and key.lstrip("+") == "sae.run" and value.startswith("glob("):
            a = f"{key}='{value}'"
        out.append(a)
    return out


if __name__ == "__main__":
    # Under nohup, SLURM or any redirect Python block-buffers stdout: a log would show nothing
    # until the run ends. Line buffering writes each message as it happens.
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)
    from sae_vision.core import unknown_override

    sys.argv = _quote_run_globs(sys.argv)
    if (why := unknown_override(sys.argv[1:], os.path.join(os.path.dirname(__file__), "conf"))):
        print(f"error: {why}", file=sys.stderr)
        sys.exit(2)
    # `stage` has no default, which stops Hydra from composing its --help page: show the help
    # as composed for one stage (the page lists every stage anyway).
    if {"--help", "-h"} & set(sys.argv) and not any(a.startswith("stage=") for a in sys.argv):
        sys.argv.append("stage=cache")
    from hydra.errors import ConfigCompositionException, OverrideParseException

    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises composition errors instead of printing
    try:
        main()
    except (ConfigCompositionException, OverrideParseException) as e:
        if USER_FULL_ERROR == "1":
            raise
        print(f"error: {composition_error(e)}", file=sys.stderr)
        sys.exit(2)
