"""The `mergeops` command line: parse, call the library, print. No logic lives here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from mergeops import __version__
from mergeops.allocator import tune_allocator
from mergeops.errors import MergeopsError, UsageError

app = typer.Typer(
    help="Continual model merging with governance: fold each new fine-tuned checkpoint into a running "
         "merged model and record where every model came from.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
# Outside a terminal (pipes, CI, journald) do not crop at 80 columns.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 240)
err = Console(stderr=True, highlight=False, soft_wrap=True)

JsonOption = typer.Option(False, "--json", help="Print exactly one JSON document on stdout.")
PolicyOption = typer.Option(..., "--policy", help="Policy file (TOML).", exists=False)


def _print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, sort_keys=False) + "\n")


def _progress(total: int, description: str, enabled: bool) -> Progress | None:
    """A byte progress bar on stderr, only for people (a terminal, not --json) and only for big jobs."""
    if not enabled or total < 256 << 20 or not err.is_terminal:
        return None
    progress = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                        TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=True)
    progress.add_task(description, total=total)
    return progress


def _version(value: bool) -> None:
    if value:
        out.print(f"mergeops {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Show the version and exit.")) -> None:
    pass


@app.command()
def inspect(path: Path = typer.Argument(..., help="A model folder."), as_json: bool = JsonOption) -> None:
    """Validate a model folder and show its digest, size, dtypes, files and problems (exit 1 if any)."""
    from mergeops.intake.inspect import inspect_folder
    from mergeops.model.finetune import scan_checkpoint

    folder, _ = scan_checkpoint(path)
    progress = _progress(folder.total_bytes if folder else 0, f"inspecting {path}", not as_json)
    if progress:
        with progress:
            report = inspect_folder(path, lambda n: progress.advance(0, n))
    else:
        report = inspect_folder(path)
    if as_json:
        _print_json(report.to_json())
    elif folder is None:
        for problem in report.problems:
            err.print(f"problem: {problem.message}", markup=False)
    else:
        table = Table(title=str(path), show_header=False)
        table.add_row("digest", report.digest or "-")
        table.add_row("architecture", report.architecture or "-")
        if report.adapter is not None:
            adapter = report.adapter
            ranks = "/".join(map(str, adapter["ranks"]))
            table.add_row("adapter", f"LoRA of {adapter['base_model_name_or_path'] or '?'}, rank {ranks}, alpha "
                          f"{adapter['lora_alpha']:g}{', rsLoRA' if adapter['use_rslora'] else ''}")
            table.add_row("targets", f"{len(adapter['targets'])}: {', '.join(adapter['targets'][:4])}"
                          f"{', ...' if len(adapter['targets']) > 4 else ''}")
            table.add_row("updates", f"{adapter['updates_parameters']:,} full-size parameters")
        table.add_row("parameters", f"{report.parameters:,}")
        table.add_row("tensors", str(report.tensors))
        table.add_row("dtypes", ", ".join(f"{k}: {v}" for k, v in report.dtypes.items()) or "-")
        table.add_row("files", ", ".join(f["name"] for f in report.files) or "-")
        out.print(table)
        for problem in report.problems:
            err.print(f"problem: {problem.message}", markup=False)
        if not report.problems:
            out.print("no problems found")
    if report.problems:
        raise typer.Exit(1)


curvature_app = typer.Typer(help="Curvature (Adam second moments) for OTA merging.", no_args_is_help=True)
app.add_typer(curvature_app, name="curvature")


@curvature_app.command("import")
def curvature_import(
    checkpoint: Path = typer.Argument(..., help="A Trainer checkpoint folder with optimizer.pt and config.json."),
    param_names: Path | None = typer.Option(None, help="Text file of trainable parameter names, one per line, in "
                                            "named_parameters() order (instead of rebuilding it from config.json)."),
) -> None:
    """Convert the Trainer's optimizer.pt into exp_avg_sq.safetensors, keyed by parameter name."""
    from mergeops.intake.curvature import import_trainer_curvature

    names = None
    if param_names is not None:
        from mergeops import untrusted
        from mergeops.errors import UntrustedFileError

        try:
            names = [line.strip() for line in untrusted.read_text(param_names).splitlines() if line.strip()]
        except UntrustedFileError as exc:
            raise UsageError(f"cannot read {exc.path}: it {exc.reason}.") from exc
    written = import_trainer_curvature(checkpoint, param_names=names)
    out.print(f"wrote {written}", markup=False)


@app.command()
def keygen(out_dir: Path = typer.Option(..., "--out", help="Directory for the new keys.")) -> None:
    """Create a signing key pair (signing.pem, signing.pub.pem) and a MergeLock key (lock.key)."""
    from mergeops.keys import generate_keys

    made = generate_keys(out_dir)
    out.print(f"wrote {made.signing_key} (private, 0600), {made.public_key}, {made.lock_key} (private, 0600)",
              markup=False)
    out.print(f"signing key fingerprint: {made.fingerprint}", markup=False)


@app.command()
def fold(checkpoint: Path = typer.Argument(..., help="The checkpoint's model folder."),
         policy: Path = PolicyOption,
         stream: str | None = typer.Option(None, help="Stream to fold into (needed when the policy has several)."),
         metrics: Path | None = typer.Option(None, help="JSON file of training metrics, e.g. {\"loss\": 0.4}."),
         allow_protected: bool = typer.Option(False, "--allow-protected",
                                              help="Fold a MergeLock-protected checkpoint anyway (recorded)."),
         as_json: bool = JsonOption) -> None:
    """Fold one checkpoint into a stream's running merged model (exit 3 if it is rejected)."""
    from mergeops.model import ModelFolder
    from mergeops.pipeline import fold_checkpoint
    from mergeops.policy import load_policy

    loaded = load_policy(policy)
    folder, _ = ModelFolder.scan(checkpoint)
    # the digest reads the checkpoint once, the fold a second time
    progress = _progress(folder.total_bytes if folder else 0, f"folding {checkpoint.name}", not as_json)
    # the library opens the ledger (taking the home's writer lock) once the arguments are checked
    if progress:
        with progress:
            result = fold_checkpoint(loaded, stream, checkpoint, metrics_file=metrics,
                                     progress=lambda n: progress.advance(0, n), allow_protected=allow_protected)
    else:
        result = fold_checkpoint(loaded, stream, checkpoint, metrics_file=metrics, allow_protected=allow_protected)
    if as_json:
        _print_json(result.to_json())
    elif result.status == "merged":
        out.print(f"{result.stream}: version {result.version} at {result.output} ({result.output_digest})",
                  markup=False)
    elif result.status == "duplicate":
        out.print(f"{result.stream}: {checkpoint} ({result.digest}) is already in version {result.version}; "
                  "nothing new", markup=False)
    else:
        err.print(f"rejected by {result.gate}: {result.reason}", markup=False)
    if not as_json:
        for note in result.notes:
            err.print(f"note: {note}", markup=False)
    if result.status == "rejected":
        raise typer.Exit(3)


@app.command()
def daemon(policy: Path = PolicyOption,
           once: bool = typer.Option(False, "--once", help="Catch up on everything pending, then exit.")) -> None:
    """Watch every registry of every stream and fold arrivals (JSON log lines on stdout)."""
    from mergeops.daemon.loop import Daemon
    from mergeops.policy import load_policy

    raise typer.Exit(Daemon(load_policy(policy), once=once).run())


@app.command()
def status(policy: Path = PolicyOption, as_json: bool = JsonOption) -> None:
    """Per stream: latest version, method, folded / rejected / pending, daemon liveness."""
    from mergeops.daemon.status import status as read_status
    from mergeops.policy import load_policy

    document = read_status(load_policy(policy))
    if as_json:
        _print_json(document)
        return
    table = Table("stream", "latest", "method", "folded", "rejected", "failed", "quarantined", "pending", "last event")
    for name, s in document["streams"].items():
        latest = f"v{s['latest_version']:04d}" if s["latest_version"] else "-"
        table.add_row(name, latest, s["method"], str(s["folded"]), str(s["rejected"]), str(s["failed"]),
                      str(s["quarantined"]), str(s["pending"]), s["last_event"] or "-")
    out.print(table)
    d = document["daemon"]
    if d["running"]:
        out.print(f"daemon: running, pid {d['pid']}, heartbeat {d['heartbeat_age_seconds']} s ago ({d['status']})")
    elif d["pid"]:
        out.print(f"daemon: not running (last seen pid {d['pid']}, {d['heartbeat_age_seconds']} s ago: "
                  f"{d['status']})", markup=False)
    else:
        out.print("daemon: never ran on this home")
    if any(s["rejected"] or s["failed"] or s["quarantined"] for s in document["streams"].values()):
        out.print("see why: mergeops rejections --policy " + str(policy), markup=False)


@app.command()
def rejections(policy: Path = PolicyOption, stream: str | None = typer.Option(None, help="Only this stream."),
               as_json: bool = JsonOption) -> None:
    """Every rejected checkpoint, failed and quarantined arrival or publication: when, which checkpoint, gate, why."""
    from mergeops.daemon.status import failures
    from mergeops.policy import load_policy

    found = failures(load_policy(policy), stream)
    if as_json:
        _print_json({"failures": found})
        return
    from rich.markup import escape

    table = Table("time", "stream", "checkpoint", "what", "gate", "reason")
    for f in found:
        table.add_row(*(escape(str(f[k] or "-")) for k in ("time", "stream", "checkpoint", "kind", "gate", "reason")))
    out.print(table if found else "no rejections and no failed arrivals")


@app.command()
def retry(policy: Path = PolicyOption, stream: str | None = typer.Option(None, help="Only this stream."),
          checkpoint: str | None = typer.Argument(None, help="Only this checkpoint (as `rejections` lists it)."),
          as_json: bool = JsonOption) -> None:
    """Put quarantined folds and publications back in line (after fixing their cause): the daemon's next start tries
    each again."""
    from mergeops.daemon.status import retry as release
    from mergeops.policy import load_policy

    released = release(load_policy(policy), stream, checkpoint)
    if as_json:
        _print_json({"retried": released})
        return
    for r in released:
        out.print(f"{r['stream']}: {r['kind']} of {r['checkpoint']} is tried again at the daemon's next start",
                  markup=False)
    if not released:
        out.print("nothing is quarantined" + (f" for {checkpoint}" if checkpoint else ""), markup=False)


@app.command()
def lineage(target: str = typer.Argument(..., help="STREAM, STREAM@VERSION, or a model folder path."),
            policy: Path = PolicyOption, as_json: bool = JsonOption) -> None:
    """Where did this model come from? Every folded checkpoint back to the base, with who signed each step."""
    from rich.tree import Tree

    from mergeops.ledger.lineage import lineage as build_lineage
    from mergeops.ledger.store import Ledger
    from mergeops.policy import load_policy

    loaded = load_policy(policy)
    with Ledger.open_readonly(loaded.home) as ledger:
        document = build_lineage(ledger, target)
    if as_json:
        _print_json(document)
        return
    found = document["found"]
    title = f"{document['stream']} v{document['version']:04d}"
    if found.get("as") != "version" or "path" in found:
        title += f"  ({found['as']}: {found.get('path', target)})"
    tree = Tree(title)
    for step in document["steps"]:
        kept = "" if step["retained"] else " [pruned]"
        node = tree.add(f"v{step['version']:04d} {step['output_digest']}{kept}\n{step['method']} "
                        f"{json.dumps(step['params'])}  {step['created']}  signed by {step['signer']}")
        c = step["checkpoint"]
        node.add(f"checkpoint {c['digest']}\nfrom {c['source']}, arrived {c['arrived']}, metrics "
                 f"{json.dumps(c['metrics'])}\ngates passed: {', '.join(step['gates'])}")
    tree.add(f"base {document['base']['digest']}\nfrom {document['base']['source']}")
    for p in document["publications"]:
        tree.add(f"published to {p['target']} ({p['created']}, signed by {p['signer']})")
    for p in document["protections"]:
        tree.add(f"protected copy {p['output_digest']} at {p['path']} (key {p['key_fingerprint']})")
    out.print(tree, markup=False)


@app.command()
def audit(policy: Path = PolicyOption, as_json: bool = JsonOption) -> None:
    """Verify the ledger's hash chain and signatures and re-hash every retained output (exit 1 if broken)."""
    from mergeops.ledger.audit import AuditReport, trusted_key
    from mergeops.ledger.audit import audit as run_audit
    from mergeops.ledger.store import Ledger
    from mergeops.policy import load_policy

    loaded = load_policy(policy)
    report = AuditReport()
    with Ledger.open_readonly(loaded.home) as ledger:
        folders = {name: [s.output, *([s.publish.to] if s.publish is not None and s.publish.to else [])]
                   for name, s in loaded.streams.items()}
        run_audit(ledger, trusted_key(loaded.keys, report), report, folders)
    if as_json:
        _print_json(report.to_json())
    else:
        for problem in report.problems:
            err.print(f"broken: {problem['message']}", markup=False)
        verdict = "intact" if not report.problems else f"{len(report.problems)} problem(s)"
        out.print(f"{report.events} events, {report.versions_checked} retained versions, {report.files_checked} "
                  f"files checked: {verdict}", markup=False)
    if report.problems:
        raise typer.Exit(1)


@app.command()
def protect(model_dir: Path = typer.Argument(..., help="The model folder to protect."),
            out_dir: Path = typer.Option(..., "--out", help="Where to write the protected copy (must not exist)."),
            key: Path = typer.Option(..., "--key", help="The MergeLock key (lock.key from `mergeops keygen`)."),
            verify: bool = typer.Option(False, "--verify", help="Also run both models through transformers."),
            anchor: Path | None = typer.Option(None, help="The public base model, to measure the anchor attack."),
            policy: Path | None = typer.Option(None, "--policy", help="Record the protection in this policy's ledger."),
            strength: int | None = typer.Option(None, "--strength", min=0, max=30,
                                                help="Scale of the transform, 2^±STRENGTH per dimension (0: signed "
                                                     "permutations only); default: the measured one in README."),
            salt: str = typer.Option("derived", "--salt",
                                     help="'derived' (from the key and the model: same bytes every time) or "
                                          "'random'."),
            as_json: bool = JsonOption) -> None:
    """Protect a model with MergeLock: same function, weights far from every other fine-tune of its base."""
    from mergeops.keys import load_lock_key
    from mergeops.policy import load_policy
    from mergeops.protect import DEFAULT_STRENGTH, record_protection
    from mergeops.protect import protect as run_protect

    if salt not in ("derived", "random"):
        raise UsageError(f"--salt must be 'derived' or 'random', not {salt!r}.")
    loaded = load_policy(policy) if policy is not None else None
    report = run_protect(model_dir, out_dir, load_lock_key(key),
                         strength=DEFAULT_STRENGTH if strength is None else strength, random_salt=salt == "random",
                         verify=verify, anchor=anchor)
    if loaded is not None:
        record_protection(loaded, report)
    if as_json:
        _print_json(report)
        return
    checks = report["function_check"]
    out.print(f"protected {report['source']} -> {report['output']} ({report['family']}, "
              f"{report['tensors_changed']} of {report['tensors_total']} tensors changed)", markup=False)
    out.print(f"strength {report['strength']}; transformed in every layer:", markup=False)
    for part in report["transformed"]:
        out.print(f"  {part}", markup=False)
    out.print(f"weights moved by at least {report['movement']['min']:.2f} of their norm", markup=False)
    for name, check in checks.items():
        if isinstance(check, dict) and "max_relative_error" in check:
            out.print(f"function check ({name}): max relative error {check['max_relative_error']:.2e}", markup=False)
    out.print(f"residual risk: {report['residual_risk']['summary']}", markup=False)
    for note in report["notes"]:
        out.print(f"note: {note}", markup=False)


@app.command()
def unprotect(model_dir: Path = typer.Argument(..., help="A folder protected with MergeLock."),
              out_dir: Path = typer.Option(..., "--out", help="Where to write the restored model (must not exist)."),
              key: Path = typer.Option(..., "--key", help="The MergeLock key that protected it."),
              as_json: bool = JsonOption) -> None:
    """Undo MergeLock with the key that applied it (a wrong key is refused)."""
    from mergeops.keys import load_lock_key
    from mergeops.protect import unprotect as run_unprotect

    report = run_unprotect(model_dir, out_dir, load_lock_key(key))
    if as_json:
        _print_json(report)
    else:
        out.print(f"restored {model_dir} -> {out_dir}", markup=False)


@app.command()
def publish(policy: Path = PolicyOption, stream: str | None = typer.Option(None),
            version: int | None = typer.Option(None, help="Version to publish (default: the latest)."),
            as_adapter: int | None = typer.Option(None, "--as-adapter", metavar="RANK",
                                                  help="Publish a LoRA adapter of this rank against the stream's "
                                                       "base instead of the full model."),
            as_json: bool = JsonOption) -> None:
    """Copy a version to the stream's publish target, sign it (OpenSSF model signing) and record it."""
    from mergeops.policy import load_policy
    from mergeops.publish.publish import publish as run_publish

    loaded = load_policy(policy)
    publication = run_publish(loaded, stream, version, as_adapter=as_adapter)
    if as_json:
        _print_json(publication.to_json())
        return
    signed = f", signed by {publication.signer}" if publication.signer else ", unsigned"
    adapter = publication.adapter
    what = (f" as a rank-{adapter.rank} LoRA adapter (relative error {adapter.error:.2e})" if adapter else "")
    out.print(f"published {publication.stream} v{publication.version:04d}{what} to {', '.join(publication.targets)}"
              f"{signed}", markup=False)
    for name, change in (adapter.not_carried.items() if adapter else ()):
        err.print(f"note: {name} changed (relative update {change:.2e}) and is not carried by the adapter",
                  markup=False)


@app.command()
def demo(policy: Path = typer.Option(Path("policies/demo.toml"), "--policy", help="The demo policy."),
         checkpoints: int = typer.Option(3, min=1, max=20, help="How many fine-tunes to generate.")) -> None:
    """Generate a small base model and fine-tunes into a local registry and fold them into a stream."""
    from mergeops.demo import run_demo

    for line in run_demo(policy, checkpoints):
        out.print(line, markup=False)


def main() -> None:
    tune_allocator()
    try:
        app()
    except MergeopsError as exc:
        err.print(f"mergeops: error: {exc}", markup=False)
        sys.exit(exc.exit_code)
