"""Commits in a temporary git repository: one per move, structured, and reversible.

Runs the real ``git`` binary on a throw-away repository; the registry and the stack are not
involved here (rollback/step are called with the alias update and the local apply switched off;
the integration tests cover those against real servers).
"""

from __future__ import annotations

import fcntl
import subprocess
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from core.stage_file import StageFile, read_stage_file, write_stage_file
from core.stages import Stage
from delivery.canary import CanaryAnalysis, Check
from delivery.canary_step import step
from delivery.canary_window import current_window, window_seconds
from delivery.context import DeliveryContext
from delivery.errors import DeliveryError, GitOpsRepoError, NoPreviousVersion
from delivery.git_repo import GitOpsRepo
from delivery.messages import DeliveryRecord, parse_record
from delivery.policy import CanaryPolicy
from delivery.rollback import rollback_stage

pytestmark = pytest.mark.unit


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "gitops"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.name", "Test Promoter")
    git(root, "config", "user.email", "promoter@example.org")
    for stage in ("staging", "canary", "production"):
        write_stage_file(root, StageFile(stage=stage))  # type: ignore[arg-type]
    (root / "README").write_text("gitops test repo\n")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "initial")
    return root


def ctx_for(root: Path) -> DeliveryContext:
    return DeliveryContext(
        gitops_dir=root,
        mlflow_uri="http://127.0.0.1:9",
        prometheus_url="http://127.0.0.1:9",
        stack_dir=root / ".stack",
    )


def commit_version(
    root: Path, stage: Stage, version: str, weight: int | None = None, variant: str = "fp32"
) -> str:
    """What promote does after its gates: write the file, commit it with a structured message."""
    before = read_stage_file(root, stage)
    content = before.model_copy(
        update={"model_version": version, "variant": variant, **({"canary_weight": weight} if weight else {})}
    )
    path = write_stage_file(root, content)
    record = DeliveryRecord(
        action="promote",
        model_name="cxr-detector",
        stage=stage,
        from_version=before.model_version,
        to_version=version,
        variant=variant,
        canary_weight=weight,
    )
    return GitOpsRepo(root).commit([path], record)


def analysis(verdict: str) -> CanaryAnalysis:
    return CanaryAnalysis(
        verdict,
        "1m",
        120.0,
        480.0,
        [Check("5xx rate", 0.5 if verdict == "fail" else 0.0, "<= 0.02", verdict != "fail")],
        "test",
    )  # type: ignore[arg-type]


def changed_files(root: Path, rev: str = "HEAD") -> list[str]:
    return git(root, "show", "--name-only", "--format=", rev).split()


def test_commit_touches_only_the_stage_file_even_with_other_staged_work(repo: Path) -> None:
    (repo / "README").write_text("someone's unrelated edit\n")
    git(repo, "add", "README")
    commit_version(repo, "staging", "4")
    assert changed_files(repo) == ["k8s/overlays/staging/model.yaml"]
    assert "README" in git(repo, "diff", "--cached", "--name-only")  # their work is still staged


def test_each_promotion_is_one_commit_with_parsable_trailers(repo: Path) -> None:
    for stage in ("staging", "canary", "production"):
        commit_version(repo, stage, "5", 10 if stage == "canary" else None)  # type: ignore[arg-type]
    log = git(repo, "log", "--format=%s").splitlines()
    assert log[:3] == [
        "promote cxr-detector 5 to production (was none)",
        "promote cxr-detector 5 to canary (was none)",
        "promote cxr-detector 5 to staging (was none)",
    ]
    trailers = git(repo, "log", "-1", "--format=%(trailers:key=Cxr-Stage,valueonly)").strip()
    assert trailers == "production"


def test_rollback_writes_the_previous_version_back_as_a_new_commit(repo: Path) -> None:
    commit_version(repo, "production", "1")
    commit_version(repo, "production", "2")
    head_before = git(repo, "rev-parse", "HEAD").strip()
    outcome = rollback_stage(
        ctx_for(repo),
        "production",
        reason="alerts",
        apply_local=False,
        update_alias=False,
        echo=lambda _: None,
    )
    assert (outcome.from_version, outcome.to_version) == ("2", "1")
    assert read_stage_file(repo, "production").model_version == "1"
    assert git(repo, "rev-parse", "HEAD~1").strip() == head_before  # history kept, not rewritten
    record = parse_record(git(repo, "log", "-1", "--format=%B"))
    assert record is not None and record.action == "rollback" and record.rolled_back_version == "2"
    assert record.reason == "alerts"


def test_second_rollback_walks_further_back_instead_of_bouncing(repo: Path) -> None:
    for version in ("1", "2", "3"):
        commit_version(repo, "production", version)
    quiet = {"apply_local": False, "update_alias": False, "echo": lambda _: None}
    assert rollback_stage(ctx_for(repo), "production", **quiet).to_version == "2"  # type: ignore[arg-type]
    assert rollback_stage(ctx_for(repo), "production", **quiet).to_version == "1"  # type: ignore[arg-type]


def test_rollback_of_first_canary_leaves_no_canary_at_weight_zero(repo: Path) -> None:
    commit_version(repo, "canary", "4", weight=50)
    rollback_stage(ctx_for(repo), "canary", apply_local=False, update_alias=False, echo=lambda _: None)
    assert read_stage_file(repo, "canary") == StageFile(stage="canary", model_version="", canary_weight=0)


def test_rollback_with_nothing_served_is_a_clear_error(repo: Path) -> None:
    with pytest.raises(NoPreviousVersion, match="serves nothing"):
        rollback_stage(ctx_for(repo), "production", apply_local=False, update_alias=False)


def test_git_revert_of_a_promotion_restores_the_previous_file(repo: Path) -> None:
    commit_version(repo, "production", "1")
    sha = commit_version(repo, "production", "2")
    git(repo, "revert", "--no-edit", sha)
    assert read_stage_file(repo, "production").model_version == "1"


def test_canary_step_raises_weight_on_pass_one_commit_per_step(repo: Path) -> None:
    commit_version(repo, "production", "1")
    commit_version(repo, "canary", "2", weight=10)
    weights = []
    for _ in range(2):
        outcome = step(ctx_for(repo), analysis=analysis("pass"), apply_local=False, echo=lambda _: None)
        assert outcome.action == "increase" and outcome.commit == git(repo, "rev-parse", "HEAD").strip()
        weights.append(read_stage_file(repo, "canary").canary_weight)
    assert weights == [50, 100]
    assert read_stage_file(repo, "production").model_version == "1"


def test_canary_step_on_fail_sets_weight_zero_and_commits_the_rollback(repo: Path) -> None:
    commit_version(repo, "production", "1")
    commit_version(repo, "canary", "2", weight=50)
    outcome = step(
        ctx_for(repo), analysis=analysis("fail"), apply_local=False, update_alias=False, echo=lambda _: None
    )
    assert outcome.action == "rollback"
    canary = read_stage_file(repo, "canary")
    assert canary.canary_weight == 0 and canary.model_version == ""
    assert read_stage_file(repo, "production").model_version == "1"
    assert "canary analysis failed" in git(repo, "log", "-1", "--format=%B")


def test_canary_step_inconclusive_changes_nothing(repo: Path) -> None:
    commit_version(repo, "canary", "2", weight=10)
    head = git(repo, "rev-parse", "HEAD")
    outcome = step(ctx_for(repo), analysis=analysis("inconclusive"), apply_local=False, echo=lambda _: None)
    assert outcome.action == "wait"
    assert git(repo, "rev-parse", "HEAD") == head


def test_push_sends_the_commit_to_the_remote_argocd_watches(repo: Path, tmp_path: Path) -> None:
    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(remote))
    git(repo, "remote", "add", "origin", str(remote))
    commit_version(repo, "staging", "9")
    GitOpsRepo(repo).push("origin")
    assert git(remote, "rev-parse", "main") == git(repo, "rev-parse", "HEAD")


def test_not_a_git_repository_is_an_actionable_error(tmp_path: Path) -> None:
    with pytest.raises(GitOpsRepoError, match="CXR_GITOPS_DIR"):
        GitOpsRepo(tmp_path)


def test_canary_window_starts_at_the_commit_that_made_this_version_canary(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new canary is judged on its own samples only: the window never reaches past its commit."""
    t0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)

    def at(offset_s: int) -> None:
        monkeypatch.setenv("GIT_COMMITTER_DATE", (t0 + timedelta(seconds=offset_s)).isoformat())

    policy = CanaryPolicy(window="5m")
    assert current_window(policy, repo, now=t0) == policy  # no canary yet: the policy as is
    at(0)
    commit_version(repo, "canary", "1", weight=10)
    at(60)
    commit_version(repo, "canary", "1", weight=50)  # a weight step keeps the version's start
    assert current_window(policy, repo, now=t0 + timedelta(seconds=100)).window == "100s"
    assert current_window(policy, repo, now=t0 + timedelta(seconds=400)).window == "5m"
    at(200)
    commit_version(repo, "canary", "2", weight=10)  # v1's samples must not judge v2
    assert current_window(policy, repo, now=t0 + timedelta(seconds=230)).window == "30s"
    assert window_seconds("30s") == 30 and window_seconds("5m") == 300 and window_seconds("1h") == 3600


def test_rollback_of_a_variant_change_goes_back_to_the_same_version_in_its_former_variant(repo: Path) -> None:
    """fp32 -> int8 of one version is a model change of its own: rolling it back serves fp32 again."""
    quiet = {"apply_local": False, "update_alias": False, "echo": lambda _: None}
    commit_version(repo, "staging", "2")
    commit_version(repo, "staging", "3")
    commit_version(repo, "staging", "3", variant="int8")
    outcome = rollback_stage(ctx_for(repo), "staging", **quiet)  # type: ignore[arg-type]
    assert (outcome.from_version, outcome.to_version) == ("3", "3")
    restored = read_stage_file(repo, "staging")
    assert (restored.model_version, restored.variant) == ("3", "fp32")
    body = git(repo, "log", "-1", "--format=%B")
    record = parse_record(body)
    assert record is not None and record.rolled_back_version == "3 int8"
    assert body.startswith("rollback staging: cxr-detector 3 -> 3\n")
    # rolled back once, int8 is not offered again: the next rollback walks on to v2
    second = rollback_stage(ctx_for(repo), "staging", **quiet)  # type: ignore[arg-type]
    assert second.to_version == "2" and read_stage_file(repo, "staging").variant == "fp32"


def test_rollback_to_an_int8_version_restores_its_variant(repo: Path) -> None:
    quiet = {"apply_local": False, "update_alias": False, "echo": lambda _: None}
    commit_version(repo, "production", "4", variant="int8")
    commit_version(repo, "production", "5")
    rollback_stage(ctx_for(repo), "production", **quiet)  # type: ignore[arg-type]
    restored = read_stage_file(repo, "production")
    assert (restored.model_version, restored.variant) == ("4", "int8")
    assert "Cxr-Variant: int8" in git(repo, "log", "-1", "--format=%B")


def test_a_canary_of_a_new_variant_has_its_own_window_and_is_not_idle(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from delivery.canary_step import _nothing_to_analyse
    from delivery.canary_window import canary_since

    for key in ("GIT_AUTHOR_DATE", "GIT_COMMITTER_DATE"):  # the fp32 canary an hour ago
        monkeypatch.setenv(key, "2026-12-01T10:00:00+00:00")
    commit_version(repo, "production", "3")
    commit_version(repo, "canary", "3", weight=10)
    first = canary_since(repo)
    for key in ("GIT_AUTHOR_DATE", "GIT_COMMITTER_DATE"):
        monkeypatch.setenv(key, "2026-12-01T11:00:00+00:00")
    commit_version(repo, "canary", "3", weight=10, variant="int8")
    assert first is not None and first.hour == 10
    since = canary_since(repo)
    assert since is not None and since.hour == 11  # INT8 is judged from its own commit, not fp32's traffic
    canary, production = read_stage_file(repo, "canary"), read_stage_file(repo, "production")
    assert _nothing_to_analyse(canary, production, 10) is None  # v3 int8 vs v3 fp32: analyse it
    same = _nothing_to_analyse(canary.model_copy(update={"variant": "fp32"}), production, 10)
    assert same is not None and same.action == "idle"


# --- a commit that fails changes nothing; two commands never interleave ---------------------------

QUIET = {"apply_local": False, "update_alias": False, "echo": lambda _: None}


def refuse_commits(root: Path) -> Path:
    """A pre-commit hook that refuses every commit; delete the returned file to allow them again."""
    hook = root / git(root, "rev-parse", "--git-path", "hooks/pre-commit").strip()
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text("#!/bin/sh\necho 'refused by the review policy' >&2\nexit 1\n")
    hook.chmod(0o755)
    return hook


def hold_index_lock(root: Path) -> Path:
    """What another git command in the checkout holds while it runs."""
    lock = root / ".git" / "index.lock"
    lock.write_text("")
    return lock


def forget_identity(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No user.name/user.email anywhere git looks, and no guessing one from the host."""
    for key in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL", "EMAIL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(root.parent / "no-global-gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    git(root, "config", "--unset", "user.name")
    git(root, "config", "--unset", "user.email")
    git(root, "config", "user.useConfigOnly", "true")


def break_commits(how: str, root: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Make the next commit fail the way ``how`` says; returns what repairs it."""
    if how == "hook":
        return refuse_commits(root).unlink
    if how == "index lock":
        return hold_index_lock(root).unlink

    def restore_identity() -> None:
        git(root, "config", "user.name", "Test Promoter")
        git(root, "config", "user.email", "promoter@example.org")

    forget_identity(root, monkeypatch)
    return restore_identity


def stage_files_as_in_head(root: Path) -> bool:
    """The working tree and the index name exactly what HEAD does, for every stage file."""
    return git(root, "status", "--porcelain", "--", "k8s").strip() == ""


@pytest.mark.parametrize("how", ["hook", "index lock", "no identity"])
def test_a_rollback_whose_commit_fails_changes_nothing_and_the_retry_rolls_back_the_same_version(
    repo: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    for version in ("1", "2", "3"):
        commit_version(repo, "production", version)
    head = git(repo, "rev-parse", "HEAD")
    repair = break_commits(how, repo, monkeypatch)
    with pytest.raises(GitOpsRepoError, match=r"git commit of k8s/overlays/production/model\.yaml failed"):
        rollback_stage(ctx_for(repo), "production", **QUIET)  # type: ignore[arg-type]
    assert read_stage_file(repo, "production").model_version == "3"  # what HEAD and the gateway serve
    repair()
    assert stage_files_as_in_head(repo) and git(repo, "rev-parse", "HEAD") == head
    outcome = rollback_stage(ctx_for(repo), "production", **QUIET)  # type: ignore[arg-type]
    assert (outcome.from_version, outcome.to_version) == ("3", "2")  # not one further, to v1
    assert read_stage_file(repo, "production").model_version == "2" and stage_files_as_in_head(repo)


def test_a_canary_step_whose_commit_fails_keeps_the_weight_and_the_retry_raises_it_once(repo: Path) -> None:
    commit_version(repo, "production", "1")
    commit_version(repo, "canary", "2", weight=10)
    hook = refuse_commits(repo)
    with pytest.raises(GitOpsRepoError, match="refused by the review policy"):
        step(ctx_for(repo), analysis=analysis("pass"), apply_local=False, echo=lambda _: None)
    assert read_stage_file(repo, "canary").canary_weight == 10 and stage_files_as_in_head(repo)
    hook.unlink()
    outcome = step(ctx_for(repo), analysis=analysis("pass"), apply_local=False, echo=lambda _: None)
    assert (outcome.action, outcome.weight_before, outcome.weight_after) == ("increase", 10, 50)
    assert read_stage_file(repo, "canary").canary_weight == 50


def test_a_first_stage_file_whose_commit_fails_is_removed_again(repo: Path) -> None:
    """A stage file that did not exist before the failed commit does not exist after it."""
    git(repo, "rm", "-q", "k8s/overlays/staging/model.yaml")
    git(repo, "commit", "-q", "-m", "staging serves nothing")
    hook = refuse_commits(repo)
    record = DeliveryRecord("promote", "cxr-detector", "staging", "", "4")
    with pytest.raises(GitOpsRepoError):
        GitOpsRepo(repo).commit_stage_files([StageFile(stage="staging", model_version="4")], record)
    assert not (repo / "k8s/overlays/staging/model.yaml").exists() and stage_files_as_in_head(repo)
    hook.unlink()
    GitOpsRepo(repo).commit_stage_files([StageFile(stage="staging", model_version="4")], record)
    assert read_stage_file(repo, "staging").model_version == "4" and stage_files_as_in_head(repo)


def test_a_delivery_command_waits_for_the_lock_a_bounded_time_then_names_it(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit_version(repo, "production", "1")
    commit_version(repo, "production", "2")
    head = git(repo, "rev-parse", "HEAD")
    monkeypatch.setattr("delivery.git_repo.LOCK_TIMEOUT_S", 0.3, raising=False)
    lock = repo / ".git" / "cxr-delivery.lock"
    with open(lock, "a+") as held:  # another process's command (flock is per open file)
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 4242: cxr promote 5 --to production\n")
        held.flush()
        with pytest.raises(DeliveryError) as refused:
            rollback_stage(ctx_for(repo), "production", **QUIET)  # type: ignore[arg-type]
        message = str(refused.value)
        assert str(lock) in message and "pid 4242: cxr promote 5 --to production" in message
        assert read_stage_file(repo, "production").model_version == "2"
        assert git(repo, "rev-parse", "HEAD") == head
    assert rollback_stage(ctx_for(repo), "production", **QUIET).to_version == "1"  # type: ignore[arg-type]


def file_at(root: Path, rev: str, stage: Stage) -> StageFile:
    from core.stage_file import parse_stage_file

    return parse_stage_file(git(root, "show", f"{rev}:k8s/overlays/{stage}/model.yaml"), stage)


def test_a_rollback_during_a_canary_step_waits_for_it_and_neither_move_is_lost(repo: Path) -> None:
    """The step read canary v2 at 10 %; a rollback then must not be overwritten by the step's 50 %."""
    commit_version(repo, "production", "1")
    commit_version(repo, "canary", "2", weight=10)
    step_has_read, rollback_went = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def step_echo(_: str) -> None:  # first called with the analysis: the step has read the files
        if not step_has_read.is_set():
            step_has_read.set()
            rollback_went.wait(timeout=30)  # the rollback waits for the lock (or, unlocked, commits)

    def run_step() -> None:
        try:
            step(ctx_for(repo), analysis=analysis("pass"), apply_local=False, echo=step_echo)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    stepper = threading.Thread(target=run_step)
    stepper.start()
    assert step_has_read.wait(timeout=30)
    quiet = {**QUIET, "echo": lambda _: rollback_went.set()}
    rollback_stage(ctx_for(repo), "canary", **quiet)  # type: ignore[arg-type]
    stepper.join(timeout=30)
    assert not stepper.is_alive() and not errors
    assert git(repo, "log", "-2", "--format=%s").splitlines() == [
        "rollback canary: cxr-detector 2 -> none",
        "canary step: cxr-detector 2 weight 50%",
    ]
    assert read_stage_file(repo, "canary") == StageFile(stage="canary", model_version="", canary_weight=0)
    for rev in ("HEAD", "HEAD~1"):  # each commit holds the file its message describes
        record = parse_record(git(repo, "log", "-1", "--format=%B", rev))
        content = file_at(repo, rev, "canary")
        assert record is not None
        assert (content.model_version, content.canary_weight) == (record.to_version, record.canary_weight)


def test_an_interrupt_after_the_commit_finished_leaves_the_committed_files(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C once git has committed: putting the old text back would leave the tree naming another
    version than HEAD, and every retry would find "nothing to commit"."""
    real_commit = GitOpsRepo.commit

    def commit_then_interrupt(self: GitOpsRepo, *args: Any, **kwargs: Any) -> str:
        real_commit(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(GitOpsRepo, "commit", commit_then_interrupt)
    head = git(repo, "rev-parse", "HEAD")
    record = DeliveryRecord("promote", "cxr-detector", "staging", "", "4")
    with pytest.raises(KeyboardInterrupt):
        GitOpsRepo(repo).commit_stage_files([StageFile(stage="staging", model_version="4")], record)
    assert git(repo, "rev-parse", "HEAD") != head
    assert read_stage_file(repo, "staging").model_version == "4" and stage_files_as_in_head(repo)


@pytest.mark.parametrize("how", ["no remote", "detached HEAD"])
def test_a_rollback_that_cannot_push_commits_nothing_and_the_retry_rolls_back_the_same_version(
    repo: Path, tmp_path: Path, how: str
) -> None:
    """Found only at the push, the rollback was already committed: the retry the error asked for
    then rolled production back one version further (v3 -> v2, then v2 -> v1)."""
    for version in ("1", "2", "3"):
        commit_version(repo, "production", version)
    head = git(repo, "rev-parse", "HEAD").strip()
    remote = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", str(remote))
    if how == "detached HEAD":
        git(repo, "remote", "add", "origin", str(remote))
        git(repo, "checkout", "-q", "--detach")
    with pytest.raises(GitOpsRepoError, match=r"no git remote named 'origin'|HEAD is detached"):
        rollback_stage(ctx_for(repo), "production", push=True, **QUIET)  # type: ignore[arg-type]
    assert git(repo, "rev-parse", "HEAD").strip() == head and stage_files_as_in_head(repo)
    if how == "detached HEAD":
        git(repo, "checkout", "-q", "main")
    else:
        git(repo, "remote", "add", "origin", str(remote))
    outcome = rollback_stage(ctx_for(repo), "production", push=True, **QUIET)  # type: ignore[arg-type]
    assert (outcome.from_version, outcome.to_version) == ("3", "2")
    assert git(remote, "rev-parse", "main") == git(repo, "rev-parse", "HEAD")


def test_a_canary_step_that_cannot_push_moves_nothing(repo: Path) -> None:
    commit_version(repo, "production", "1")
    commit_version(repo, "canary", "2", weight=10)
    head = git(repo, "rev-parse", "HEAD")
    with pytest.raises(GitOpsRepoError, match="no git remote named 'origin'"):
        step(ctx_for(repo), analysis=analysis("pass"), push=True, apply_local=False, echo=lambda _: None)
    assert git(repo, "rev-parse", "HEAD") == head and read_stage_file(repo, "canary").canary_weight == 10


def commit_by_hand(root: Path, stage: Stage, text: str | bytes, message: str) -> None:
    path = root / "k8s" / "overlays" / stage / "model.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    git(root, "commit", "-q", "-am", message)


def test_a_garbage_revision_in_the_past_does_not_block_rollback_or_the_canary_window(repo: Path) -> None:
    """A stage file once committed as garbage by hand (and fixed by a later commit) made every
    rollback and every canary analysis of that stage fail on the old revision's parse error."""
    commit_version(repo, "production", "1")
    commit_version(repo, "production", "2")
    commit_by_hand(repo, "production", "stage: production\nmodel_version: [oops\n", "hand edit")
    commit_by_hand(repo, "production", 'stage: production\nmodel_version: "3"\n', "fix the hand edit")
    outcome = rollback_stage(ctx_for(repo), "production", **QUIET)  # type: ignore[arg-type]
    assert (outcome.from_version, outcome.to_version) == ("3", "2")

    t0 = datetime.now(UTC)
    commit_version(repo, "canary", "4", weight=10)
    commit_by_hand(repo, "canary", b"stage: canary\nmodel_version: \xff\n", "not UTF-8")
    commit_by_hand(repo, "canary", 'stage: canary\nmodel_version: "4"\ncanary_weight: 10\n', "fixed")
    policy = CanaryPolicy(window="1h")
    # the window starts at the fix: what the canary served during the garbage revision is unknown
    fixed_at = GitOpsRepo(repo)._repo.head.commit.committed_datetime
    window = current_window(policy, repo, now=fixed_at + timedelta(seconds=30)).window
    assert window == "30s" and fixed_at >= t0.replace(microsecond=0)


def test_a_healthy_canary_at_weight_100_is_judged_on_its_own_numbers_not_kept_waiting(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What Prometheus answers once every request goes to the canary (production's counters flat:
    its rates and p95 are 0/0): the last step waited "inconclusive" at every run, for good."""
    from delivery.canary import PrometheusClient, build_queries
    from delivery.canary_window import analyze_current_canary

    at_100: dict[str, float | None] = {
        "canary-requests": 600.0,
        "production-requests": 0.0,
        "error-rate": 0.0,
        "production-error-rate": None,
        "p95-latency-ratio": None,
        "detection-shift": None,
        "confidence-shift": None,
        "agreement": 0.9,
    }
    by_query = {query: at_100[name] for name, query in build_queries("5m").items()}
    monkeypatch.setattr(PrometheusClient, "scalar", lambda self, query: by_query[query])
    policy = CanaryPolicy(window="5m")
    old = datetime.now(UTC) - timedelta(hours=1)
    monkeypatch.setenv("GIT_COMMITTER_DATE", old.isoformat())  # the window is the policy's 5m
    commit_version(repo, "production", "1")
    commit_version(repo, "canary", "2", weight=50)
    assert analyze_current_canary("http://prometheus", policy, repo).verdict == "inconclusive"
    commit_version(repo, "canary", "2", weight=100)
    result = analyze_current_canary("http://prometheus", policy, repo)
    assert result.verdict == "pass", result.lines()
