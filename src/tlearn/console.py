"""What the command line prints: the train summary, evaluation tables, doctor findings (Rich, names escaped)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

from tlearn.outputs import terminal_text

out = Console()
err = Console(stderr=True)


def print_summary(clf, out_dir: Path) -> None:
    s, bundle = clf.summary_, clf.bundle_
    table = Table(title=f"tlearn train: {terminal_text(s.data)}", show_header=False, title_justify="left")
    table.add_row("layout", s.layout)
    table.add_row("classes", str(s.classes))
    table.add_row("images", ", ".join(f"{k} {v}" for k, v in s.images.items()))
    rate = f" ({s.images_per_second:.0f} img/s)" if s.images_per_second else ""
    built = f"; engine built once in {s.engine_build_seconds:.1f}s" if s.engine_build_seconds else ""
    table.add_row("features", f"{s.extracted} extracted in {s.extract_seconds:.1f}s{rate}, {s.from_cache} from "
                              f"cache{built}")
    if s.device:
        table.add_row("device", f"{s.device['name']} ({terminal_text(s.device['reason'])})")
    table.add_row("head", head_text(s.cv or {}, s.head_C, bundle.training.get("head", {})))
    if s.cv:
        table.add_row("cross-validated", f"accuracy {s.cv['accuracy']:.4f}, balanced {s.cv['balanced_accuracy']:.4f}"
                                         f" (out of fold, n={s.cv['n']}; it chose the model, so it is a little "
                                         "optimistic)")
        table.add_row("recall per class", recall_text(s.cv))
    views = bundle.training.get("views")
    if views and views["asked"] != "off":
        table.add_row("mirror", view_text(views))
    if s.backbone_choice:
        table.add_row("backbone auto", backbone_choice_text(s.backbone_choice))
    if s.finetune:
        ft = s.finetune
        table.add_row("fine-tune", f"{ft['epochs_run']} epoch(s) in {ft['seconds']:.0f}s, best {ft['best_epoch']}, "
                                   f"{ft['precision_used']}, unfrozen {','.join(ft['unfrozen']) or 'all'}")
        for stage, m in clf.metrics_["stages"].items():
            table.add_row(f"{stage} val / test", " / ".join(f"{m[k]['accuracy']:.4f}" for k in m))
        table.add_row("kept", f"{ft['chosen']} (better on an inner split of train)")
    for split, m in ((k, v) for k, v in clf.metrics_.items() if k in ("val", "test")):
        table.add_row(f"{split} accuracy", f"{m['accuracy']:.4f} {interval(m, 'accuracy')} (mean class "
                                           f"{m['mean_class_accuracy']:.4f} {interval(m, 'mean_class_accuracy')}, "
                                           f"n={m['n']})")
    calibration = bundle.extra.get("calibration")
    if calibration:
        ece = ", ".join(f"{split} {calibration['ece_before'][split]:.3f} -> {calibration['ece_after'][split]:.3f}"
                        for split in calibration["ece_after"])
        table.add_row("calibration", f"temperature {calibration['temperature']:.3f} (fitted on "
                                     f"{calibration.get('fitted_on', 'val')}); ECE {ece}")
    table.add_row("time", f"{s.seconds:.1f}s")
    table.add_row("model", terminal_text(out_dir))
    out.print(table)
    if clf.metrics_.get("cv", {}).get("note"):
        err.print(f"[yellow]note:[/] {terminal_text(clf.metrics_['cv']['note'])}", highlight=False, soft_wrap=True)
    print_data_warning(bundle.extra.get("data_checks", {}))
    print_leaks(clf.metrics_.get("leaks", {}))
    if s.skipped_files:
        err.print(f"[yellow]skipped {len(s.skipped_files)} unreadable file(s):[/]")
        for path, reason in s.skipped_files:
            err.print(f"  {terminal_text(path)}: {terminal_text(reason)}", highlight=False, soft_wrap=True)


def head_text(cv: dict, C: float, head: dict) -> str:
    """The head, what chose it and what the shipped one was fitted on."""
    if not cv:
        return f"linear softmax, C={C:g}"
    weighting = ", class-balanced weights" if head.get("class_weight") == "balanced" else ""
    prior = head.get("imagenet_prior") or {}
    if prior.get("used"):
        weighting += ", with the backbone's ImageNet probabilities beside the features"
    elif prior.get("dropped_by") == "finetune":
        weighting += " (the stage-1 head's ImageNet probabilities are not kept by the fine-tuned network)"
    elif prior.get("asked") == "auto" and prior.get("scores"):
        weighting += " (the ImageNet probabilities beside the features did not help)"
    return (f"linear softmax, C={C:g}{weighting}; chosen by {cv['folds']['k']}-fold cross-validation on train "
            f"({cv['chosen_by'].removeprefix('cross-validated ')} {cv['score']:.4f}); refit on "
            f"{head.get('refit', 'train')}")


def recall_text(cv: dict, most: int = 12) -> str:
    """Out-of-fold recall of each class, lowest first (the classes a user should look at)."""
    recalls = sorted((m["recall"], name) for name, m in cv.get("per_class", {}).items())
    shown = ", ".join(f"{terminal_text(name)} {r:.2f}" for r, name in recalls[:most])
    return shown + (f", ... ({len(recalls) - most} more in metrics.json)" if len(recalls) > most else "")


def view_text(views: dict) -> str:
    """The views the head uses, how they were chosen, and what they cost at prediction."""
    how = (f"chosen by cross-validation on train ({views['images']} images, log loss): " + ", ".join(
        f"{name} {score['log_loss']:.3f}" for name, score in views["scores"].items()) if views["asked"] == "auto"
        else "asked for")
    return (f"{views['chosen']} ({how}); predictions take {views['forwards_per_image']} forward pass"
            f"{'es' if views['forwards_per_image'] > 1 else ''} per image")


def backbone_choice_text(choice: dict) -> str:
    """Each backbone `--backbone auto` tried: its inner-split accuracy and what it cost."""
    tried = "; ".join(f"{t['name']} log loss {t['log_loss']:.3f}, accuracy {t['accuracy']:.3f} in {t['seconds']:.1f}s"
                      f" ({t['extracted']} extracted)" for t in choice["trials"])
    return f"{choice['chosen']} kept, best by {choice['split']} ({choice['images']} images): {tried}"


def print_leaks(leaks: dict) -> None:
    if leaks.get("count"):
        err.print(f"[bold yellow]warning:[/] {leaks['count']} exact or near-duplicate image pair(s) sit in different "
                  "splits, so the val/test figures above are optimistic (counted in metrics.json under \"leaks\"); "
                  "e.g.:", highlight=False)
        for example in leaks["examples"][:5]:
            err.print(f"  {' <-> '.join(terminal_text(p) for p in example['paths'])} ({' / '.join(example['splits'])}, "
                      f"{example['bits']} bits apart)", highlight=False)


def interval(m: dict, key: str) -> str:
    low_high = m.get("ci95", {}).get(key)
    return f"[{low_high[0]:.3f}, {low_high[1]:.3f}]" if low_high else ""


def print_data_warning(checks: dict) -> None:
    errors = [f for f in checks.get("findings", []) if f["severity"] == "error"]
    if errors:
        err.print(f"[bold red on white] WARNING: {len(errors)} data problem(s) make these numbers untrustworthy "
                  "[/]", highlight=False)
        for finding in errors[:10]:
            err.print(f"  [red]{finding['kind']}[/]: {terminal_text(finding['message'])}: "
                      f"{terminal_text(', '.join(finding['paths']))}", highlight=False)
        err.print("  run `tlearn doctor DATA` for the full list (it also checks near-duplicates).")


def print_evaluation(metrics: dict, split: str) -> None:
    out.print(f"[bold]{split}[/]: accuracy {metrics['accuracy']:.4f} {interval(metrics, 'accuracy')}, mean class "
              f"accuracy {metrics['mean_class_accuracy']:.4f} {interval(metrics, 'mean_class_accuracy')}, "
              f"balanced accuracy {metrics['balanced_accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}, "
              f"n={metrics['n']} (brackets: bootstrap 95% CI)")
    evaluated = metrics.get("evaluated")
    if evaluated:
        out.print(f"scored: {evaluated['how']}", highlight=False)
        if evaluated["left_out_trained"]:
            out.print(f"left out: {evaluated['left_out_trained']} image(s) whose content trained this model",
                      highlight=False)
        if split == "train" and evaluated["training_folder"]:
            err.print("[yellow]note[/]: these images trained the model: the figure is optimistic", highlight=False)
        elif not evaluated["training_images_known"]:
            err.print("[yellow]note[/]: this model folder does not record its training images and its training "
                      "folder is gone: images that trained it could not be left out", highlight=False)
    table = Table("class", "precision", "recall", "f1", "n")
    for name, row in metrics["per_class"].items():
        table.add_row(terminal_text(name), f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}",
                      str(row["support"]))
    out.print(table)
    print_confusion(metrics)


def print_confusion(metrics: dict) -> None:
    classes = metrics["classes"]
    table = Table("true \\ predicted", *[terminal_text(c[:10]) for c in classes], title="confusion matrix",
                  title_justify="left")
    for name, row in zip(classes, metrics["confusion_matrix"]):
        table.add_row(terminal_text(name), *[str(v) for v in row])
    out.print(table)


def print_suspects(report, top: int, csv_out: Optional[Path]) -> None:
    """Suspect labels as a table, most suspect first (tlearn.evaluate.suspects.SuspectReport)."""
    safe = terminal_text
    out.print(f"[bold]tlearn doctor --labels[/]: {len(report.suspects)} of {report.images} training images have a "
              f"label the out-of-fold probabilities contradict ({100 * report.share:.1f}%; confident learning "
              f"estimates {report.estimated_errors} wrong labels), ranked by "
              f"{report.ranked_by.replace('_', '-')}; from {safe(report.source)}", highlight=False)
    if report.suspects:
        table = Table("rank", "path", "given", "suggested", "p(given)", "p(suggested)")
        for s in report.suspects[:top]:
            table.add_row(str(s.rank), safe(s.path), safe(s.given), safe(s.suggested), f"{s.self_confidence:.3f}",
                          f"{s.suggested_probability:.3f}")
        out.print(table)
        if len(report.suspects) > top:
            out.print(f"... {len(report.suspects) - top} more (--top N, --csv FILE or --json for all)",
                      highlight=False)
    if csv_out is not None:
        out.print(f"written: {safe(csv_out)}", highlight=False)
    out.print("to fix one: move the file to its class folder (`tlearn relabel DATA FILE` does it with a journal and "
              "--undo), or list it in a relabel CSV (path,label) for `tlearn train --relabel FILE`", highlight=False)


def print_doctor(report, moved: list[dict], quarantine: Optional[Path]) -> None:
    safe = terminal_text
    out.print(f"[bold]tlearn doctor[/]: {safe(report.root)} ({safe(report.layout or 'layout not usable')}), "
              f"{report.files_checked} files", highlight=False)
    table = Table("split", *[safe(c) for c in report.classes], "imbalance", title="images per class",
                  title_justify="left")
    for split, counts in report.counts.items():
        table.add_row(safe(split), *[str(counts.get(c, 0)) for c in report.classes], f"{report.imbalance[split]:.2f}")
    out.print(table)
    for finding in report.findings:
        colour = "red" if finding.severity == "error" else "yellow"
        out.print(f"[{colour}]{finding.severity}[/] [bold]{finding.kind}[/]: {safe(finding.message)}",
                  highlight=False, soft_wrap=True)
        for path in finding.paths:
            out.print(f"    {safe(path)}", highlight=False, soft_wrap=True)  # whole, to copy and paste
    if moved:
        out.print(f"moved {len(moved)} file(s) to {safe(quarantine)} (reasons in "
                  f"{safe(quarantine / 'reasons.csv')})", highlight=False)
    verdict = (f"[bold red]{len(report.errors)} error(s)[/] that corrupt an evaluation" if report.errors
               else "[green]no errors[/]")
    out.print(f"{verdict}, {len(report.warnings)} warning(s)")
