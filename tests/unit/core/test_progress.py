"""core/progress.py: live rows on a terminal, ``event=...`` lines with no control characters elsewhere."""

from __future__ import annotations

import io
import re
import threading

import pytest
from rich.console import Console

from core.progress import Reporter, format_event, reporting

pytestmark = pytest.mark.unit

CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # everything but the newline ending each line
HOSTILE = 'evil\x1b[31mred\x1b[0m\r\nfake event=x\x07\x9b2J "quoted" tab\there'


def plain() -> tuple[Reporter, io.StringIO]:
    out = io.StringIO()
    return Reporter(Console(file=out, width=100)), out


def terminal() -> tuple[Reporter, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100, color_system="truecolor")
    return Reporter(console), out


def test_without_a_terminal_every_event_is_one_structured_line() -> None:
    reporter, out = plain()
    assert not reporter.live
    reporter.event("stack_component_done", "[green]✓[/] s3", component="s3", state="healthy", seconds=1.234)
    with reporter.task("pipeline_step", "[1/8] ingest", step="ingest", index=1) as task:
        task.done("ok", "16 images, 0 feedback items")
    with reporter.bar("train_epoch", "train r", 2, run="r") as bar:
        bar.update(1, "loss 1.5", epoch=1, loss=1.5)
        bar.update(2, "loss 1.25", epoch=2, loss=1.25)
    lines = out.getvalue().splitlines()
    assert lines[0] == "event=stack_component_done component=s3 state=healthy seconds=1.2"
    assert lines[1] == "event=pipeline_step_start step=ingest index=1"
    assert lines[2].startswith("event=pipeline_step_done step=ingest index=1 state=ok seconds=")
    assert lines[2].endswith('detail="16 images, 0 feedback items"')
    assert lines[3:] == [
        "event=train_epoch run=r epoch=1 loss=1.5",
        "event=train_epoch run=r epoch=2 loss=1.25",
    ]


def test_a_task_that_raises_ends_failed_with_the_exception_type() -> None:
    reporter, out = plain()
    with pytest.raises(KeyError), reporter.task("stack_component", "s3", component="s3"):
        raise KeyError("boom")
    done = out.getvalue().splitlines()[-1]
    assert done.startswith("event=stack_component_done component=s3 state=failed seconds=")
    assert done.endswith("error=KeyError")


def test_hostile_text_stays_on_one_line_without_control_characters() -> None:
    reporter, out = plain()
    reporter.event(HOSTILE, HOSTILE, gate=HOSTILE, observed=HOSTILE)
    with reporter.task("promote_check", HOSTILE, check=HOSTILE) as task:
        task.done("fail", HOSTILE, why=HOSTILE)
    text = out.getvalue()
    lines = text.splitlines()
    assert len(lines) == 3  # nothing the text carried started a line of its own
    assert not CONTROL.search(text)
    for line in lines:
        assert line.startswith("event=")
        # every value is one token: bare, or a JSON string (quotes escaped inside)
        value = r'("([^"\\]|\\.)*"|[^\s"]+)'
        assert re.fullmatch(rf"event={value}( [a-z_]+={value})*", line), line


def test_values_are_formatted_for_grep() -> None:
    line = format_event("x", {"seconds": 12.345, "map50": 0.123456, "ok": True, "gone": None, "text": ""})
    assert line == 'event=x seconds=12.3 map50=0.1235 ok=true text=""'


def test_on_a_terminal_a_task_shows_its_label_state_and_time() -> None:
    reporter, out = terminal()
    assert reporter.live
    with reporter.task("stack_component", "mlflow", component="mlflow") as task:
        task.done("healthy", "after 0.5 s of waiting")
    with pytest.raises(RuntimeError), reporter.task("stack_component", "gateway", component="gateway"):
        raise RuntimeError("no")
    reporter.close()
    text = out.getvalue()
    assert "\x1b[" in text  # rendered for a terminal: colours and cursor moves
    assert "event=" not in text
    assert "✓" in text and "mlflow" in text and "after 0.5 s of waiting" in text
    assert "✗" in text and "gateway" in text


def test_on_a_terminal_a_bar_leaves_its_last_numbers_on_screen() -> None:
    reporter, out = terminal()
    with reporter.bar("train_epoch", "train run-1", 3, run="run-1") as bar:
        for epoch in (1, 2, 3):
            bar.update(epoch, f"loss {2.0 / epoch:.3f}  mAP50 0.{epoch}00", epoch=epoch)
    text = out.getvalue()
    assert "train run-1" in text and "3/3" in text and "loss 0.667  mAP50 0.300" in text
    assert reporter._progress is None  # the live display stopped with its last row


def test_markup_in_labels_is_shown_not_interpreted_on_a_terminal() -> None:
    reporter, out = terminal()
    with reporter.task("pipeline_step", "[1/8] ingest [bold]x[/bold]", spinner=False) as task:
        task.done("ok", "[red]detail[/red]")
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert "▶ [1/8] ingest [bold]x[/bold]" in shown
    assert "[1/8] ingest [bold]x[/bold]" in shown.splitlines()[-1] and "[red]detail[/red]" in shown


def test_control_sequences_in_labels_and_details_never_reach_a_terminal() -> None:
    """An exception's message or a server's answer in a label or detail cannot drive the terminal.

    Rich drops BEL and CR but passes ESC: an OSC sequence (set the title, write the clipboard) or a
    CSI one (clear the screen, hide text) from outside would reach the operator's terminal.
    """
    out = io.StringIO()
    reporter = Reporter(Console(file=out, force_terminal=True, width=200, color_system=None))
    osc = "\x1b]52;c;cm0gLXJmIH4=\x07"  # write "rm -rf ~" to the clipboard
    with reporter.task("step", f"label{osc}", spinner=False) as task:
        task.done("failed", f"detail {HOSTILE}", reason=osc)
    reporter.event("note", f"text{osc}\x1b[2J")
    reporter.event("note", None, value=HOSTILE)
    shown = out.getvalue()
    assert "\x1b" not in shown and "\x9b" not in shown, repr(shown)
    assert "label ]52;c;cm0gLXJmIH4=" in shown and "fake event=x" in shown  # shown, not obeyed


def test_text_empty_shows_nothing_on_a_terminal_but_logs_the_line() -> None:
    live, live_out = terminal()
    live.event("promote_gate", "", gate="onnx parity", verdict="pass")
    assert live_out.getvalue() == ""
    logs, logs_out = plain()
    logs.event("promote_gate", "", gate="onnx parity", verdict="pass")
    assert logs_out.getvalue() == 'event=promote_gate gate="onnx parity" verdict=pass\n'


def test_nested_commands_share_the_outermost_reporter() -> None:
    out = io.StringIO()
    with reporting(Console(file=out), live=False) as outer, reporting(Console(), live=True) as inner:
        assert inner is outer
        inner.event("inner_event", n=1)
    assert out.getvalue() == "event=inner_event n=1\n"
    with reporting(Console(file=io.StringIO())) as fresh:
        assert fresh is not outer


def test_events_from_another_thread_do_not_interleave() -> None:
    reporter, out = plain()

    def many(tag: str) -> None:
        for i in range(200):
            reporter.event("tick", tag=tag, i=i)

    threads = [threading.Thread(target=many, args=(t,)) for t in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = out.getvalue().splitlines()
    assert len(lines) == 400 and all(re.fullmatch(r"event=tick tag=[ab] i=\d+", line) for line in lines)
