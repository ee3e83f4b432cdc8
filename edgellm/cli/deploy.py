"""edgellm deploy: package a model as a service for a device."""
from __future__ import annotations

from pathlib import Path

import click

from .output import emit_json, err, human_bytes


@click.group("deploy")
def command() -> None:
    """Package a model to run as a service on a device.

    \b
    Targets:
      rpi    a Raspberry Pi bundle (offline install, systemd service)
    """


@command.command("rpi")
@click.argument("model", required=False)
@click.option("--board", default="pi5-8gb", show_default=True,
              help="pi5-16gb, pi5-8gb, pi5-4gb, pi4-8gb, pi4-4gb, pi4-2gb, zero2w.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Bundle directory to write (replaced atomically).")
@click.option("--tar", "make_tar", is_flag=True, help="Also write OUTPUT.tar.gz.")
@click.option("--ctx", "n_ctx", type=int, default=2048, show_default=True, help="Context size of the service.")
@click.option("--kv-type", default="f16", show_default=True, help="KV-cache type: f16, q8_0, q4_0, f32.")
@click.option("--system", "--system-prompt", "system_prompt", default=None,
              help="Default system prompt; its KV state is precomputed and shipped.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the service listens on (0.0.0.0: the whole network).")
@click.option("--port", type=int, default=None, help="Port [default: 8080, 50052 with --rpc-worker].")
@click.option("--rpc-worker", is_flag=True,
              help="Bundle an RPC worker (no model: the main node sends its layers) instead of a server.")
@click.option("--json", "as_json", is_flag=True, help="Print the bundle report as JSON.")
def rpi(model: str | None, board: str, output: Path, make_tar: bool, n_ctx: int, kv_type: str,
        system_prompt: str | None, host: str, port: int | None, rpc_worker: bool, as_json: bool) -> None:
    """Build a Raspberry Pi bundle that installs without internet or a compiler: the model,
    llama.cpp built for the board's CPU, every Python dependency as aarch64 wheels, a systemd unit,
    install.sh / uninstall.sh, a health check and a README. Refuses a board that cannot hold the
    model (with the numbers).

    \b
    Example:
      edgellm deploy rpi smollm2-135m --board pi5-8gb -o kiosk --tar
      scp kiosk.tar.gz pi@raspberrypi.local:
      ssh pi@raspberrypi.local 'tar xzf kiosk.tar.gz && sudo kiosk/install.sh'
    The first build cross-compiles llama.cpp (minutes; cached afterwards).
    """
    from ..deploy.bundle import BundleSpec, build_bundle
    from ..runtimes.rpc import DEFAULT_PORT

    if system_prompt is not None and rpc_worker:
        raise click.UsageError("--system belongs to a server bundle, not an --rpc-worker one")
    spec = BundleSpec(board=board, n_ctx=n_ctx, kv_type=kv_type, system_prompt=system_prompt, host=host,
                      port=port or (DEFAULT_PORT if rpc_worker else 8080), rpc_worker=rpc_worker, tar=make_tar)
    with _progress() as say:
        report = build_bundle(model, output, spec, progress=say)
    if as_json:
        emit_json(report.to_dict())
        return
    fit = report.fit or {}
    if fit.get("message"):
        err.print(fit["message"])
    err.print(f"wrote {report.path}: {report.files} files, {human_bytes(report.bytes)} "
              f"(service {report.service}, board {report.board}"
              f"{', runtime from cache' if report.runtime_cached else ''})")
    if report.tar_path:
        err.print(f"wrote {report.tar_path}: {human_bytes(report.tar_bytes or 0)}")
    err.print(f"on the board: sudo {report.path}/install.sh && {report.path}/healthcheck.sh")


class _progress:
    """One rich bar per step on stderr (silent when stderr is not a terminal)."""

    STEPS = {"runtime": "llama.cpp for aarch64", "wheels": "aarch64 wheels", "model": "model",
             "state": "system prompt state", "tar": "tar.gz"}

    def __enter__(self):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description:<22}"), BarColumn(), TimeElapsedColumn(),
                            TextColumn("{task.fields[detail]}"), console=err, disable=not err.is_terminal)
        self.bar.__enter__()
        self.tasks: dict[str, int] = {}
        return self.update

    def update(self, step: str, frac: float, detail: str) -> None:
        if step not in self.tasks:
            for t in self.tasks.values():
                self.bar.update(t, completed=1.0)
            self.tasks[step] = self.bar.add_task(self.STEPS.get(step, step), total=1.0, detail="")
        self.bar.update(self.tasks[step], completed=frac, detail=detail[:60])

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            for t in self.tasks.values():
                self.bar.update(t, completed=1.0)
        self.bar.__exit__(*exc)
