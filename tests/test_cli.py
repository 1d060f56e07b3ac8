import pytest

from diffusets_jax.cli import build_parser, main


def test_top_level_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "diffusets-jax" in out


def test_unknown_command_is_an_error():
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["no-such-command"])
    assert exc.value.code == 2


def test_version_names_the_package_version_and_the_commit_to_cite(capsys):
    import subprocess
    from pathlib import Path

    from diffusets_jax import __version__
    from tests.helpers.cli import exit_code

    assert exit_code(["--version"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.startswith(f"diffusets-jax {__version__}")
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / ".git").exists():  # run from a checkout: the commit, as stamped into every artifact
        head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        assert f"(git {head[:12]}" in printed


def test_train_help_says_an_existing_model_dir_component_needs_overwrite():
    """`train --help` said --model-dir atomically replaces a component of the same name, and that --overwrite only
    concerns the workdir; the command refuses a converted or another run's component unless --overwrite."""
    import argparse

    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {action.dest: action.help for action in commands.choices["train"]._actions}
    assert "refused unless --overwrite" in helps["model_dir"]
    assert "--model-dir" in helps["overwrite"]


def _command_help(command: str) -> str:
    """`diffusets-jax COMMAND --help` as one line of text (argparse wraps it at the terminal's width)."""
    import argparse

    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return " ".join(commands.choices[command].format_help().split())


def test_prepare_help_says_which_source_is_not_split_by_patient():
    """`prepare --help` promised patient-disjoint splits for every source, but the CinC Challenge names no patients:
    each record is its own subject, so one patient's records can land in train and test. The help says so for that
    source and only claims patient-disjoint splits where the builder has patient ids."""
    from pathlib import Path

    from diffusets_jax.data.sources import builder_class

    cinc = Path(__file__).resolve().parents[1] / "diffusets_jax" / "demo_data" / "cinc2021"
    candidates = builder_class("physionet-challenge").list_candidates(None, str(cinc))
    assert candidates and all(c.subject_id == c.study_id for c in candidates)  # a subject per record
    assert len({c.subject_id for c in candidates}) == len(candidates)
    text = _command_help("prepare")
    assert "patient-disjoint train/validation/test splits" in text
    assert "except physionet-challenge's: its records name no patient, so they are split by record" in text


def test_evaluate_clip_help_says_the_first_model_dirs_clip_scores_them_all(tmp_path, monkeypatch, capsys):
    """`evaluate --help` said --clip defaults to "the --model-dir's own clip"; with several --model-dir every one is
    scored by the first one's CLIP (one scorer for the comparison), not each by its own. The help says so."""
    import types

    from diffusets_jax.experiments import evaluate as ev

    assert "(default: the first --model-dir's clip, which then scores every --model-dir)" in _command_help("evaluate")
    for name in ("a", "b", "data"):
        (tmp_path / name).mkdir()
    builder = types.SimpleNamespace(info=types.SimpleNamespace(splits={"test": None}))
    monkeypatch.setattr(ev, "ecg_dataset", lambda *args, **kwargs: builder)
    asked = []

    def find_clip(model_dir, clip_dir):
        asked.append((model_dir, clip_dir))
        raise ValueError("stopped here")

    monkeypatch.setattr(ev, "find_clip", find_clip)
    code = main(["evaluate", "--model-dir", str(tmp_path / "a"), str(tmp_path / "b"), "--dataset", str(tmp_path / "data"),
                 "--out", str(tmp_path / "out")])
    assert code == 2 and "stopped here" in capsys.readouterr().err
    assert asked == [(str(tmp_path / "a"), None)]  # the first model directory's CLIP, for both


@pytest.mark.parametrize("argv, dest, expected", [
    (["evaluate", "--model-dir", "a", "--model-dir", "b", "c", "--dataset", "d", "--out", "o"], "model_dir",
     ["a", "b", "c"]),
    (["evaluate", "--model-dir", "a", "b", "--labels", "x", "--labels", "y", "--dataset", "d", "--out", "o"], "labels",
     ["x", "y"]),
    (["encode", "--vae", "v", "--dataset", "d", "--out", "o", "--splits", "train", "--splits", "test"], "splits",
     ["train", "test"]),
], ids=["evaluate-model-dir", "evaluate-labels", "encode-splits"])
def test_a_list_flag_given_twice_keeps_every_value(argv, dest, expected):
    """`evaluate --model-dir A --model-dir B` (how "several --model-dir" in its --help reads) kept B alone: one model
    was generated and scored, with no comparison and no word about A. The same for --labels and encode --splits."""
    assert getattr(build_parser().parse_args(argv), dest) == expected


def test_prepare_help_names_ptbxls_prompt_and_splits():
    """`prepare --help` said every dataset holds the ordered prompt; ptbxl's default configs hold the paper's PTB-XL
    free-text prompt (and split by strat_fold), a U-Net conditioned on another prompt style than a user expected."""
    from diffusets_jax.data.sources import builder_class

    configs = {c.name: c for c in builder_class("ptbxl").BUILDER_CONFIGS}
    text = _command_help("prepare")
    for name in ("local", "openai"):
        assert (configs[name].prompt_style, configs[name].split_by) == ("free_text", "strat_fold")
    for name in ("local_subject_hash_ordered", "openai_subject_hash_ordered"):
        assert (configs[name].prompt_style, configs[name].split_by) == ("ordered", "subject_hash")
    assert "prompt (the ordered prompt; ptbxl's local and openai configs: the paper's PTB-XL template" in text
    assert ("ptbxl's split by its strat_fold with the free-text prompt, and ptbxl also has "
            "'<embedder>_subject_hash_ordered' (patient-hash splits, ordered prompt)") in text
    for source in ("mimic-iv-ecg", "physionet-challenge"):  # "the ordered prompt" holds for the others
        assert {c.prompt_style for c in builder_class(source).BUILDER_CONFIGS} == {"ordered"}


def test_sample_wfdb_fs_help_states_the_accepted_range():
    """`sample --help` said --wfdb-fs takes "at least 100 Hz"; 10,001 Hz and above is refused too. The range it
    states is the one `check_output_fs` accepts."""
    import re

    from diffusets_jax.io.wfdb_out import check_output_fs

    low, high = (float(x) for x in re.search(r"--wfdb-fs WFDB_FS .*?; (\d+) to (\d+) Hz;", _command_help("sample"))
                 .groups())
    assert check_output_fs(low) == low and check_output_fs(high) == high
    for outside in (low - 0.1, high + 0.1):
        with pytest.raises(ValueError, match="--wfdb-fs must be a rate in Hz"):
            check_output_fs(outside)


@pytest.mark.parametrize("command", ["plot", "turing-kit"])
def test_dpi_help_states_the_range_the_command_accepts(command, tmp_path, capsys):
    """plot's --dpi help said "the mm scale holds at any dpi" and turing-kit's gave no range, yet both refuse a dpi
    outside a range (10..2000, 30..600). Each help now states its range, checked against the command."""
    import re

    from diffusets_jax.experiments.turing import KitOptions

    low, high = (int(x) for x in re.search(r"--dpi DPI [^(]*?(\d+) to (\d+)", _command_help(command)).groups())
    for dpi in (low - 1, low, high, high + 1):
        if command == "turing-kit":
            try:
                KitOptions("alignment", n_generated=1, dpi=dpi).check()
                refused = ""
            except ValueError as err:
                refused = str(err)
        else:  # refused before any record is read; an accepted dpi fails on the missing record instead
            main(["plot", str(tmp_path / "none"), "--out-dir", str(tmp_path / "out"), "--dpi", str(dpi)])
            refused = capsys.readouterr().err
        assert ("--dpi must be" in refused) == (dpi in (low - 1, high + 1)), (dpi, refused)


def test_sample_steps_help_states_the_posterior_default():
    """`sample --steps` said ddpm defaults to 1000 steps; with --reference --observe (posterior sampling) ddpm, named
    or not, runs the posterior's 100-step chain, whose cost is K particles per step. The help says so, from what
    `sample` runs."""
    import argparse
    import re

    from diffusets_jax import posterior_pipeline
    from diffusets_jax.diffusion.samplers import SAMPLER_DEFAULTS

    found = re.search(r"--steps STEPS network evaluations \(default: ddpm (\d+), ddim (\d+), dpmpp_2m (\d+); ddpm with "
                      r"--reference --observe: (\d+)\)", _command_help("sample"))
    assert found
    ddpm, ddim, dpmpp, posterior = (int(g) for g in found.groups())
    assert (ddpm, ddim, dpmpp) == tuple(SAMPLER_DEFAULTS[n].steps for n in ("ddpm", "ddim", "dpmpp_2m"))
    task = argparse.Namespace(mode="reconstruct")
    assert posterior_pipeline.default_sampler(task) == ("ddpm", posterior)


def test_describe_temperature_help_states_the_range_it_accepts():
    """`describe --temperature` refused values above the API's 2 with no range in its help."""
    import argparse
    import re

    from diffusets_jax.cli import _temperature

    low, high = (float(x) for x in re.search(r"--temperature TEMPERATURE sampling temperature, (\S+) to (\S+) \(",
                                             _command_help("describe")).groups())
    assert _temperature(str(low)) == low and _temperature(str(high)) == high
    for outside in (low - 0.01, high + 0.01):
        with pytest.raises(argparse.ArgumentTypeError):
            _temperature(str(outside))


@pytest.mark.parametrize("inside", ["", "out", "out/deeper"])
def test_prepare_refuses_a_data_dir_inside_the_manual_dir(tmp_path, capsys, inside):
    """`prepare --manual-dir dl --data-dir dl/out` was accepted: the builder walks every folder under --manual-dir,
    so the output was walked as part of the download by the next prepare. Refused in one line, nothing written."""
    manual = tmp_path / "dl"
    manual.mkdir()
    data_dir = manual / inside if inside else manual
    assert main(["prepare", "physionet-challenge", "--manual-dir", str(manual), "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--data-dir {data_dir} is inside --manual-dir {manual}" in err and len(err.splitlines()) == 1, err
    assert list(manual.iterdir()) == []
