"""The `edgellm` command: a thin layer over the Python API, one module per verb."""
from __future__ import annotations

import importlib
import os
import sys

import click

from ..errors import EdgeLLMError

VERBS = ["pull", "models", "inspect", "devices", "convert", "eval", "run", "chat", "cache_prompt", "bench", "deploy",
         "plan", "serve", "rpc_worker", "prune", "distill", "package", "optimize"]


class LazyGroup(click.Group):
    """Import a verb's module only when it runs, so `edgellm --help` stays instant."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [v.replace("_", "-") for v in VERBS]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        mod = name.replace("-", "_")
        if mod not in VERBS:
            return None
        return importlib.import_module(f"{__name__}.{mod}").command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="edgellm", prog_name="edgellm")
@click.option("-v", "--verbose", is_flag=True,
              help="Show llama.cpp's own log and full tracebacks (or EDGELLM_LOG=debug).")
def cli(verbose: bool) -> None:
    """edgellm — run and convert LLMs for laptops, Raspberry Pis and phones.

    \b
    Quick start (the embedded SmolLM2-135M model is fetched on first use):
      edgellm run "What is a Raspberry Pi?"     one answer, streamed
      edgellm chat                              interactive chat with KV-cache reuse
      edgellm devices                           what this device has and which backend runs
      edgellm inspect smollm2-135m              a model's metadata, tensors and safety check

    Models are a store alias (smollm2-135m), a .gguf path or a model directory.
    Environment: EDGELLM_HOME (store, caches), EDGELLM_THREADS, EDGELLM_MODEL, EDGELLM_LOG=debug, NO_COLOR.
    """
    if verbose:
        os.environ["EDGELLM_LOG"] = "debug"


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and a distinct exit code."""
    try:
        rc = cli.main(args=argv, prog_name="edgellm", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("edgellm: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except EdgeLLMError as e:
        if os.environ.get("EDGELLM_LOG", "").lower() == "debug":
            raise
        click.echo(f"edgellm: error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("\nedgellm: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.stderr.close()
        sys.exit(0)
    sys.exit(rc if isinstance(rc, int) else 0)
