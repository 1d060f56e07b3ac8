"""`io.run_dir`: what `--overwrite` may replace. The claiming, resuming and refusing of output folders are tested
through the commands (`test_io_outputs.py`, `test_cli_edges.py`); every command's inputs there too."""

from __future__ import annotations

import json
import os
import re

import pytest

from diffusets_jax.io.run_dir import RUN_FILE, check_reads_apart, output_dir


def test_an_output_folder_that_is_or_holds_an_input_is_refused(tmp_path):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "cond.csv").write_text("text,sex,age,hr\n")
    dataset, conditions = [("--dataset", project / "data")], [("--conditions", project / "cond.csv")]
    check_reads_apart(tmp_path / "elsewhere", dataset)
    check_reads_apart(tmp_path / "proj", [("--conditions", tmp_path / "project" / "cond.csv")])  # not a prefix test
    check_reads_apart(project, [("--dataset", None)])  # an input not given
    with pytest.raises(ValueError, match=r"--out .*/project holds --dataset .*/project/data, which this run reads: "
                                         r"--overwrite would replace it with this run's outputs; choose another --out"):
        check_reads_apart(project, dataset)
    with pytest.raises(ValueError, match=r"--workdir .*/data is --dataset .*; choose another --workdir"):
        check_reads_apart(project / "data", dataset, "--workdir")
    # Inside an input folder, with or without --overwrite: its outputs would mix with a model's or dataset's files.
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"--out .*/data/out is inside --dataset .*/project/data, which this run "
                                             r"reads: its outputs would mix with that folder's own files"):
            check_reads_apart(project / "data" / "out", dataset, overwrite=overwrite)
    check_reads_apart(project / "data" / "out", [("--data-dir", project / "data")])  # a data dir holds datasets
    check_reads_apart(project / "cond.csv" / "out", conditions, overwrite=False)  # a file is no folder to mix into
    # Paths are compared as they resolve: through `..` and symbolic links.
    (tmp_path / "link").symlink_to(project)
    for out in (tmp_path / "link", project / "data" / "..", tmp_path / "elsewhere" / ".." / "project"):
        with pytest.raises(ValueError, match="holds --conditions"):
            check_reads_apart(out, conditions)
    with pytest.raises(ValueError, match="holds --conditions"):
        check_reads_apart(project, [("--conditions", tmp_path / "link" / "cond.csv")])


def test_an_output_inside_the_run_folder_of_an_input_file_is_refused(tmp_path):
    """`turing-kit --generated GEN/samples.npz --out GEN/kit` put the kit (its key) inside the sample run's folder,
    which that sample command's `--overwrite` then deletes; a `GEN/wfdb` input or a kit's `key.json` likewise."""
    run = tmp_path / "generated"
    (run / "wfdb").mkdir(parents=True)
    (run / RUN_FILE).write_text('{"command": "sample", "status": "complete"}')
    (run / "samples.npz").write_bytes(b"")
    for read in (run / "samples.npz", run / "wfdb"):
        with pytest.raises(ValueError, match=r"--out .*/generated/kit is inside .*/generated, the run folder of "
                                             r"--generated .*, which this run reads: its outputs would mix"):
            check_reads_apart(run / "kit", [("--generated", read)], overwrite=False)
    check_reads_apart(tmp_path / "kit", [("--generated", run / "samples.npz")], overwrite=False)  # beside it
    check_reads_apart(run, [("--embedding-cache", run / "cache.sqlite")], overwrite=False)  # the run's own folder
    plain = tmp_path / "mine"  # a file in a folder of the user's, no run record: nothing to mix with
    plain.mkdir()
    (plain / "samples.npz").write_bytes(b"")
    check_reads_apart(plain / "kit", [("--generated", plain / "samples.npz")], overwrite=False)


def test_overwrite_leaves_a_folder_holding_an_input_as_it_was(tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "cond.csv").write_text("text,sex,age,hr\n")
    with pytest.raises(ValueError, match="holds --conditions"):
        with output_dir(out, command="sample", settings={}, overwrite=True, reads=[("--conditions", out / "cond.csv")]):
            raise AssertionError("the run must not start")
    assert os.listdir(out) == ["cond.csv"] and sorted(os.listdir(tmp_path)) == ["project"]  # no lock, no staging


def test_without_overwrite_nothing_is_replaced_so_an_earlier_run_resumes(tmp_path):
    ours = tmp_path / "ours"
    with output_dir(ours, command="sample", settings={"n": 1}) as run:
        (run.path / "cond.csv").write_text("text,sex,age,hr\n")
    with output_dir(ours, command="sample", settings={"n": 1}, reads=[("--conditions", ours / "cond.csv")]) as run:
        assert run.resumed and (run.path / RUN_FILE).is_file()


def test_a_failed_overwrite_run_keeps_its_outputs_for_the_same_command_to_resume(tmp_path):
    """A training with --overwrite that stopped on a NaN loss (or Ctrl-C) had its staging folder removed, checkpoints
    and all, while its error line named the last good checkpoint there. Its outputs stay, the folder it was to
    replace stays as it was, and the same command resumes them; a failed run that wrote nothing leaves nothing."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(RuntimeError, match="loss is nan"):
        with output_dir(out, command="train vae", settings={"lr": 1}, overwrite=True) as run:
            staging = run.path
            (run.path / "checkpoints").mkdir()
            (run.path / "checkpoints" / "1").write_text("step 1")
            raise RuntimeError("loss is nan at step 2")
    assert sorted(os.listdir(out)) == ["notes.txt"]
    assert (staging / "checkpoints" / "1").read_text() == "step 1"
    with output_dir(out, command="train vae", settings={"lr": 1}, overwrite=True) as run:
        assert run.path == staging and (run.path / "checkpoints" / "1").is_file()  # resumed from its checkpoints
        assert run.resumed and not run.complete
    assert (out / "checkpoints" / "1").is_file() and not (out / "notes.txt").exists() and not staging.exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("the user's")
    with pytest.raises(RuntimeError):
        with output_dir(other, command="train vae", settings={"lr": 1}, overwrite=True):
            raise RuntimeError("failed before any output")
    assert sorted(os.listdir(tmp_path)) == ["other", "run"]  # no empty staging folder beside them


def test_an_overwrite_killed_after_it_finished_is_resumed_as_finished_and_swapped_in(tmp_path, capsys):
    """A run with --overwrite killed between its last output and the swap: its rerun was told it was a new run
    (`resumed` false), so a command redid finished work (every model of an evaluation), and the record written
    again lost the code version that had written the outputs."""
    out = tmp_path / "eval"
    with output_dir(out, command="evaluate", settings={"seed": 0}) as run:
        (run.path / "report.md").write_text("seed 0")
    with pytest.raises(KeyboardInterrupt):
        with output_dir(out, command="evaluate", settings={"seed": 1}, overwrite=True) as run:
            staging = run.path
            assert not run.resumed
            (run.path / "report.md").write_text("seed 1")
            run.mark_complete()
            run.record["code"] = {"package_version": "0.0.older"}  # as if an earlier version had written it
            (run.path / RUN_FILE).write_text(json.dumps(run.record))
            raise KeyboardInterrupt  # the kill before the swap
    assert (out / "report.md").read_text() == "seed 0" and (staging / "report.md").read_text() == "seed 1"
    with output_dir(out, command="evaluate", settings={"seed": 1}, overwrite=True) as run:
        assert run.path == staging and run.resumed and run.complete
    assert (out / "report.md").read_text() == "seed 1" and not staging.exists()
    assert json.loads((out / RUN_FILE).read_text())["code"] == {"package_version": "0.0.older"}


def test_overwrite_through_a_symbolic_link_replaces_the_folder_it_points_to(tmp_path):
    """`--out results --overwrite` with results -> /scratch/results: the link itself was replaced by a new folder
    (written beside the link, on its disk) and the old run's outputs stayed where it pointed."""
    scratch, home = tmp_path / "scratch", tmp_path / "home"
    scratch.mkdir()
    home.mkdir()
    with output_dir(scratch / "results", command="sample", settings={"seed": 0}) as run:
        (run.path / "samples.npz").write_text("seed 0")
    link = home / "results"
    link.symlink_to(scratch / "results")
    with output_dir(link, command="sample", settings={"seed": 1}, overwrite=True) as run:
        assert run.path.parent == scratch  # staged on the disk of the folder it replaces
        (run.path / "samples.npz").write_text("seed 1")
    assert link.is_symlink() and link.resolve() == (scratch / "results").resolve()
    assert (scratch / "results" / "samples.npz").read_text() == "seed 1"
    assert json.loads((scratch / "results" / RUN_FILE).read_text())["settings"] == {"seed": 1}
    assert sorted(os.listdir(home)) == ["results"] and sorted(os.listdir(scratch)) == ["results"]


def test_overwrite_never_deletes_a_run_writing_in_a_subfolder_now(tmp_path):
    """`--out A --overwrite` while a `--out A/sub` ran: A was swapped out at the end with the other run's folder in
    it, and that run went on writing into the deleted folder and ended with exit 0, its outputs gone."""
    a = tmp_path / "A"  # a folder of the user's (another run's output folder is refused as a --out's parent)
    a.mkdir()
    (a / "notes.txt").write_text("mine")
    with output_dir(a / "sub", command="sample", settings={"seed": 7}) as inner:
        (inner.path / "samples.npz").write_text("seed 7, being written")
        with pytest.raises(ValueError, match=r"^--out .*A holds .*A/sub, where another diffusets-jax run is writing "
                                             r"now: --overwrite would delete its outputs; wait for it to finish"):
            with output_dir(a, command="sample", settings={"seed": 1}, overwrite=True):
                raise AssertionError("the run must not start")
    # One that starts in a subfolder while the --overwrite run works: found before the swap, nothing is replaced.
    later = output_dir(a / "sub", command="sample", settings={"seed": 7})
    with pytest.raises(ValueError, match=r"where another diffusets-jax run is writing now: .*\(this run's outputs "
                                         r"are left in .*\.A\.new-[0-9a-f]+: run the same command again"):
        with output_dir(a, command="sample", settings={"seed": 1}, overwrite=True) as run:
            (run.path / "samples.npz").write_text("seed 1")
            later.__enter__()
    assert (a / "sub" / "samples.npz").read_text() == "seed 7, being written"
    assert (a / "notes.txt").read_text() == "mine" and not (a / "samples.npz").exists()
    later.__exit__(None, None, None)
    # Finished, it holds no lock: the same command replaces the folder, as asked.
    with output_dir(a, command="sample", settings={"seed": 1}, overwrite=True) as run:
        (run.path / "samples.npz").write_text("seed 1")
    assert (a / "samples.npz").read_text() == "seed 1" and not (a / "sub").exists()


def test_an_output_folder_inside_another_runs_output_folder_is_refused(tmp_path):
    """`--out A/sub` with A another run's output folder was accepted, with or without --overwrite: its files mixed
    with that run's own, whose rerun then took A for a user's folder and whose --overwrite deleted them. The run
    claiming A may still nest its own folders in it (the demo's samples/ and evaluation/)."""
    a = tmp_path / "A"
    with output_dir(a, command="evaluate", settings={"seed": 0}) as run:
        (run.path / "report.md").write_text("seed 0")
        with output_dir(a / "samples", command="sample", settings={"seed": 0}) as inner:  # its own nesting
            (inner.path / "samples.npz").write_text("seed 0")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"^--out .*A/sub/deeper is inside .*A, the output folder of a "
                                             r"diffusets-jax evaluate run: its files would mix with that run's own"):
            with output_dir(a / "sub" / "deeper", command="sample", settings={"seed": 1}, overwrite=overwrite):
                raise AssertionError("the run must not start")
    assert sorted(os.listdir(a)) == [".diffusets-run-p0.lock", RUN_FILE, "report.md", "samples"]
    # Beside it, or inside a folder of the user's, is fine.
    with output_dir(tmp_path / "B", command="sample", settings={"seed": 1}):
        pass


def test_a_folder_removed_by_a_run_that_failed_while_this_one_started_is_one_line(tmp_path, monkeypatch):
    """Two runs into a new --out: the first created it and failed at once, removing the folder it had made
    (`_undo_claim`) just after the second's mkdir; the second stopped on "...lock: No such file or directory"."""
    from diffusets_jax.io import run_dir

    lock = run_dir.exclusive_lock

    def after_the_other_run_undid_its_claim(directory, *args, **kwargs):
        os.rmdir(directory)
        return lock(directory, *args, **kwargs)

    monkeypatch.setattr(run_dir, "exclusive_lock", after_the_other_run_undid_its_claim)
    out = tmp_path / "new"
    with pytest.raises(ValueError, match=r"^--out .*new: another diffusets-jax run that was starting there failed and "
                                         r"removed the folder it had created while this run started: run the command "
                                         r"again$"):
        with output_dir(out, command="sample", settings={}):
            raise AssertionError("the run must not start")
    monkeypatch.setattr(run_dir, "exclusive_lock", lock)
    with output_dir(out, command="sample", settings={}) as run:  # run again: it claims the folder
        assert run.path == out and not run.resumed


def test_overwrite_never_replaces_the_current_or_the_home_directory(tmp_path, monkeypatch, capsys):
    """`--out .` refused as a user's folder, then given --overwrite, would have replaced the folder the user works
    in (their checkout, their home) with a command's outputs."""
    from diffusets_jax.cli import main
    from diffusets_jax.io.run_dir import check_output_path

    work, home = tmp_path / "projects" / "ecg", tmp_path / "home"
    work.mkdir(parents=True)
    home.mkdir()
    (work / "notes.txt").write_text("a user's file")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    for out, expected in ((".", "is the current directory"), (work, "is the current directory"),
                          (tmp_path / "projects", "holds the current directory"), (home, "is your home directory"),
                          (tmp_path, "holds the current directory")):
        with pytest.raises(ValueError, match=f"{expected} .*: --overwrite replaces the folder as a whole; give --out a "
                                             "folder of its own"):
            check_output_path(out, overwrite=True)
        check_output_path(out)  # without --overwrite nothing is replaced (a user's folder is refused elsewhere)
    check_output_path(work / "samples", overwrite=True)
    check_output_path(home / "samples", overwrite=True)
    assert main(["plot", "missing.hea", "--out-dir", ".", "--overwrite"]) == 2
    assert "--out-dir . is the current directory" in capsys.readouterr().err
    assert os.listdir(work) == ["notes.txt"]


OLD_CODE = {"package_version": "0.0.1", "git_commit": "0123456789abcdef", "git_dirty": False}


def _begun_by_old_code(path):
    """Pretend the run in `path` was begun (and crashed) under an older diffusets-jax."""
    from diffusets_jax.io.files import read_json, write_json_atomic

    record = read_json(path / RUN_FILE, "run record")
    write_json_atomic(path / RUN_FILE, {**record, "code": OLD_CODE})


def test_a_run_resumed_by_other_code_records_both_versions_and_says_so(tmp_path, capsys):
    """An upgrade between a crash and the rerun: the fingerprint (settings, inputs) matches, so the run resumes,
    but its outputs now come from two versions; before, nothing recorded that."""
    from diffusets_jax.io.files import read_json
    from diffusets_jax.io.run_dir import code_history
    from diffusets_jax.provenance import code_version

    out = tmp_path / "out"
    with output_dir(out, command="sample", settings={"n": 1}) as run:
        (run.path / "part").write_text("written by the old code")
    _begun_by_old_code(out)
    with output_dir(out, command="sample", settings={"n": 1}) as run:
        assert run.resumed and code_history(run.record) == [OLD_CODE, code_version()]
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert (f"--out {out} was last written by diffusets-jax 0.0.1 (commit 0123456789ab) and is resumed by "
            "diffusets-jax ") in err and "lists both (resumed_by)" in err
    record = read_json(out / RUN_FILE, "run record")  # on disk at once: a second crash keeps the history
    assert code_history(record) == [OLD_CODE, code_version()] and record["resumed_by"][0]["created"]

    with output_dir(out, command="sample", settings={"n": 1}) as run:  # the same code again: nothing new
        assert code_history(run.record) == [OLD_CODE, code_version()]
        run.mark_complete()
    assert capsys.readouterr().err == ""
    _begun_by_old_code(out)  # a finished run reopened by other code adds nothing to it, so records nothing
    with output_dir(out, command="sample", settings={"n": 1}) as run:
        assert run.complete and len(code_history(run.record)) == 2
    assert capsys.readouterr().err == ""


def test_a_refused_rerun_names_each_changed_dotted_key_as_the_fingerprint_compares_it(tmp_path):
    """A training's settings nest (`config.optimizer.learning_rate`): the message compared only the top-level keys
    and cut them to 40 characters (`config: {"model_kind": ...} -> {"model_kind": ...}`), and compared with
    Python's == while the fingerprint hashes JSON text, so 32.0 -> 32 was "same settings, other version"."""
    out = tmp_path / "run"
    recorded = {"model": "vae", "config": {"model": {"widths": (32, 64, 64), "groups": 8},
                                           "optimizer": {"learning_rate": 1e-3, "b1": 0.9}}}
    with output_dir(out, command="train vae", settings=recorded) as run:
        (run.path / "config.json").write_text("{}")
    changed = {"model": "vae", "config": {"model": {"widths": (32.0, 64, 64), "groups": 8},
                                          "optimizer": {"learning_rate": 2e-3, "b1": 0.9}}}
    with pytest.raises(ValueError) as refused:
        with output_dir(out, command="train vae", settings=changed):
            raise AssertionError("the run must not start")
    assert ("run with other settings (config.model.widths: [32, 64, 64] -> [32.0, 64, 64], "
            "config.optimizer.learning_rate: 0.001 -> 0.002): choose a new directory") in str(refused.value)
    many = {"model": "vae", "config": {"model": {"widths": (16,), "groups": 4, "remat": True},
                                       "optimizer": {"learning_rate": 1e-2, "b1": 0.5}}}
    with pytest.raises(ValueError, match=re.escape("config.optimizer.b1: 0.9 -> 0.5 and 1 more "
                                                   "(config.optimizer.learning_rate)")):
        with output_dir(out, command="train vae", settings=many):
            raise AssertionError("the run must not start")


def test_settings_that_resolve_alike_are_the_same_run_and_the_record_keeps_its_fingerprint(tmp_path):
    """A training resolves `num_train_examples: 0` from its dataset and saves the resolved config; given that
    saved config back, its fingerprint differs, but it is the same run (`resolve`)."""
    from diffusets_jax.io.files import read_json

    def resolve(settings):
        return {**settings, "n": settings.get("n") or 33}

    out = tmp_path / "run"
    with output_dir(out, command="train vae", settings={"n": 0, "lr": 1}, resolve=resolve) as run:
        (run.path / "config.json").write_text("{}")
    digest = read_json(out / RUN_FILE, "run record")["fingerprint"]
    with output_dir(out, command="train vae", settings={"n": 33, "lr": 1}, resolve=resolve) as run:
        assert run.resumed
    assert read_json(out / RUN_FILE, "run record")["fingerprint"] == digest
    with pytest.raises(ValueError, match=r"other settings \(lr: 1 -> 2\)"):  # what resolved alike is not named
        with output_dir(out, command="train vae", settings={"n": 33, "lr": 2}, resolve=resolve):
            raise AssertionError("the run must not start")
    with pytest.raises(ValueError, match=r"other settings \(n: 33 -> 32\)"):  # as resolved: what ran
        with output_dir(out, command="train vae", settings={"n": 32, "lr": 1}, resolve=resolve):
            raise AssertionError("the run must not start")


def test_a_dataset_being_read_is_not_replaced_and_one_being_replaced_is_not_read(tmp_path):
    """`reading` (a training) and an --overwrite's exclusive hold on the same dataset exclude each other, whichever
    came first; readers share it. A dataset without the lock file (an older one) is read without a lock."""
    from diffusets_jax.io.run_dir import READERS_LOCK, add_readers_lock, exclusive_lock, reading

    old = tmp_path / "old"
    old.mkdir()
    with reading(old):  # nothing to lock, and nothing written into the dataset
        assert os.listdir(old) == []
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    add_readers_lock(dataset)
    with reading(dataset), reading(dataset):  # two trainings on one dataset
        with pytest.raises(ValueError, match="^busy$"):
            with exclusive_lock(dataset, "busy", name=READERS_LOCK):
                pass
    with exclusive_lock(dataset, "busy", name=READERS_LOCK):
        with pytest.raises(ValueError, match=f"^{re.escape(str(dataset))} is being replaced now .*wait for it"):
            with reading(dataset):
                pass
    with reading(dataset), exclusive_lock(tmp_path, "busy", name=READERS_LOCK):  # another folder's lock
        pass


def test_a_run_that_fails_having_written_nothing_leaves_no_folder_it_made(tmp_path):
    """A claimed folder outlived a run that failed before writing anything (`plot` of records none of which could be
    drawn): empty but for its run record, with the parents made for it. Folders the run did not make, and a
    failed run's outputs, stay."""
    (tmp_path / "existing").mkdir()
    with pytest.raises(ValueError, match="nothing drawn"), output_dir(tmp_path / "existing" / "a" / "b",
                                                                       command="plot", settings={}):
        raise ValueError("nothing drawn")
    assert [p.name for p in tmp_path.iterdir()] == ["existing"] and not any((tmp_path / "existing").iterdir())
    with pytest.raises(ValueError, match="nothing drawn"), output_dir(tmp_path / "existing", command="plot",
                                                                       settings={}):
        raise ValueError("nothing drawn")
    assert (tmp_path / "existing").is_dir() and not any((tmp_path / "existing").iterdir())
    with pytest.raises(ValueError, match="half drawn"), output_dir(tmp_path / "new", command="plot",
                                                                    settings={}) as run:
        (run.path / "a.png").write_bytes(b"png")
        raise ValueError("half drawn")
    assert (tmp_path / "new" / "a.png").is_file() and (tmp_path / "new" / RUN_FILE).is_file()


def _claim_on_two_processes(tmp_path, outs, settings, write=False, overwrite=False):
    """`output_dir` on two processes (gloo on 127.0.0.1), process i claiming outs[i] with settings[i] (and
    `overwrite`): each one's {"error": message} or {"claimed": path, "resumed", "complete"}; with `write`, each writes
    an output file there and the run is marked complete. A process still waiting after 120 s (a hang at a
    collective) fails."""
    import json

    from tests.helpers.two_processes import run_worker_pair

    results = [tmp_path / f"process{i}.json" for i in range(2)]
    run_worker_pair("run_dir_two_process_worker.py",
                    lambda i: [outs[i], json.dumps(settings[i]), results[i], *(["write"] if write else []),
                               *(["overwrite"] if overwrite else [])])
    return [json.loads(path.read_text()) for path in results]


@pytest.mark.multiprocess
def test_a_refusal_on_one_host_stops_every_host_with_its_line(tmp_path):
    # Process 1's --out (its own disk, say) holds another run: before, process 0 waited for it at the barrier forever.
    with output_dir(tmp_path / "other", command="sample", settings={"seed": 9}) as run:
        (run.path / "samples.npz").write_bytes(b"")
    results = _claim_on_two_processes(tmp_path, [tmp_path / "new", tmp_path / "other"], [{"seed": 0}] * 2)
    for result in results:  # process 1 its own line, process 0 the same naming process 1
        assert re.fullmatch(r"(process 1 of 2 stopped: )?--out \S+other holds an earlier sample run with other "
                            r"settings \(seed: 9 -> 0\).*", result["error"]), result
    assert results[0]["error"].startswith("process 1 of 2 stopped: ")


@pytest.mark.multiprocess
def test_hosts_on_disks_of_their_own_resume_their_run(tmp_path):
    # Each host's --out on a disk of its own (two folders here). Only process 0 wrote the run record, so the rerun
    # that resumes a crashed run found process 1's outputs without one and refused them as a user's folder; and each
    # host read `complete` from its own disk, so one could return at once while another went on to generate.
    outs = [tmp_path / "host0", tmp_path / "host1"]
    first = _claim_on_two_processes(tmp_path, outs, [{"seed": 0}] * 2, write=True)
    assert [r.get("resumed") for r in first] == [False, False], first
    # Each host's record says the run finished: `evaluate --generated` refuses an unfinished sample run's folder.
    assert [json.loads((out / RUN_FILE).read_text())["status"] for out in outs] == ["complete"] * 2
    again = _claim_on_two_processes(tmp_path, outs, [{"seed": 0}] * 2)
    for result, out in zip(again, outs, strict=True):
        assert result.get("claimed") == str(out), result  # resumed, not refused
        assert result["resumed"] and result["complete"], result  # as process 0's record says, on every host
    # Another command is still refused on the host of its own disk: its record names the run.
    other = _claim_on_two_processes(tmp_path, outs, [{"seed": 1}] * 2)
    assert all("holds an earlier sample run with other settings (seed: 0 -> 1)" in r["error"] for r in other), other


@pytest.mark.multiprocess
def test_overwrite_replaces_the_folder_of_a_host_on_a_disk_of_its_own(tmp_path):
    # Only process 0 swapped its staging folder in: process 1's new outputs stayed in the hidden `.host1.new-*`
    # sibling, and its --out kept the replaced run's files, as if they were this run's.
    outs = [tmp_path / "host0", tmp_path / "host1"]
    _claim_on_two_processes(tmp_path, outs, [{"seed": 0}] * 2, write=True)
    for out in outs:
        (out / "old-run.dat").write_bytes(b"old")
    results = _claim_on_two_processes(tmp_path, outs, [{"seed": 1}] * 2, write=True, overwrite=True)
    assert all("claimed" in r for r in results), results
    for out in outs:
        assert not (out / "old-run.dat").exists(), out
        assert json.loads((out / RUN_FILE).read_text())["settings"] == {"seed": 1}, out
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".host")) == []


@pytest.mark.multiprocess
def test_hosts_given_other_settings_are_refused_naming_the_difference(tmp_path):
    # Another --seed on one host would mix two runs in one folder: one line on every host, not an AssertionError.
    results = _claim_on_two_processes(tmp_path, [tmp_path / "out"] * 2, [{"seed": 0}, {"seed": 5}])
    for result in results:
        assert "other settings (process 0 -> process 1: seed: 0 -> 5)" in result["error"], result
    assert not (tmp_path / "out" / RUN_FILE).exists()


def test_an_output_folder_that_is_a_dangling_link_is_named_as_such(tmp_path):
    """`--out` a symbolic link whose target is gone was refused only by mkdir, as "PATH: File exists", which says
    neither what is wrong nor what to do; nothing is created either way."""
    link = tmp_path / "samples"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(ValueError, match=r"symbolic link to .*gone, which does not exist: create that folder"):
        with output_dir(link, command="sample", settings={}):
            pass
    assert not (tmp_path / "gone").exists() and link.is_symlink()


@pytest.mark.parametrize("given", ["", "  "], ids=["empty", "blank"])
def test_an_empty_output_path_is_refused_not_read_as_the_current_directory(tmp_path, monkeypatch, given):
    """`--out "$OUT"` with OUT unset: Path("") is ".", so an empty current directory was claimed and written into."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--out is empty: give a path"):
        with output_dir(given, command="sample", settings={}):
            pass
    assert os.listdir(tmp_path) == []
