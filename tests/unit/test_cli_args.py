"""Argument parsing of the `modelgrid` CLI: usage errors exit 2 with a message, before any network call."""

from __future__ import annotations

import pytest

from modelgrid import cli, types


def _exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    return int(exc.value.code)


def test_prompt_ids_parse() -> None:
    args = cli.build_parser().parse_args(["generate", "--model", "m", "--prompt-ids", "1, 2,3"])
    assert args.prompt_ids == [1, 2, 3] and args.prompt is None
    assert args.gateway is None and args.max_tokens is None and args.stop == []


@pytest.mark.parametrize("ids", ["1,a", "", "1,,2", "1.5", "99999999999", " , "])
def test_bad_prompt_ids_are_usage_errors(ids: str, capsys) -> None:
    assert _exit_code(["generate", "--model", "m", "--prompt-ids", ids]) == 2
    assert "--prompt-ids" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["generate", "--model", "m"],  # no prompt
    ["generate", "--model", "m", "--prompt", "x", "--prompt-ids", "1"],  # both
    ["generate", "--prompt", "x"],  # no model
    ["generate", "--model", "m", "--prompt", "x", "--max-tokens", "0"],
    ["generate", "--model", "m", "--prompt", "x", "--seed", "-3"],
    ["generate", "--model", "m", "--prompt", "x", "--temperature", "hot"],
    ["up", "--port", "70000"],
    ["up", "--workers", "0"],
    ["models", "register", "dir"],  # no --name
    ["models", "replicas", "m", "-1"],
    ["models"],
    ["placement"],
    ["embed", "--model", "m"],  # no text
    [],
    ["frobnicate"],
])
def test_usage_errors_exit_2(argv: list[str]) -> None:
    assert _exit_code(argv) == 2


def test_full_generate_line() -> None:
    args = cli.build_parser().parse_args([
        "generate", "--model", "demo", "--prompt", "hello", "--max-tokens", "8", "--temperature", "0", "--top-p", "0.9",
        "--top-k", "5", "--seed", "42", "--stop", "\n", "--stop", "END", "--version", "prod", "--json",
        "--gateway", "h:1",
    ])
    assert (args.model, args.prompt, args.max_tokens, args.temperature, args.top_p, args.top_k, args.seed) == (
        "demo", "hello", 8, 0.0, 0.9, 5, 42)
    assert args.stop == ["\n", "END"] and args.version == "prod" and args.json and args.gateway == "h:1"


def test_up_defaults_and_flags() -> None:
    args = cli.build_parser().parse_args(["up"])
    assert (args.workers, args.port, args.demo, args.redis_url, args.db_url, args.data_dir) == (
        2, 50051, False, None, None, None)
    args = cli.build_parser().parse_args(["up", "--workers", "3", "--port", "6000", "--data-dir", "/d", "--demo",
                                          "--redis-url", "redis://x:1/0", "--db-url", "sqlite:///x.db"])
    assert (args.workers, args.port, args.data_dir, args.demo) == (3, 6000, "/d", True)


def test_models_commands() -> None:
    parse = cli.build_parser().parse_args
    args = parse(["models", "register", "./ckpt", "--name", "n", "--alias", "a", "--alias", "b", "--replicas", "2",
                  "--stages", "3"])
    assert (args.directory, args.name, args.alias, args.replicas, args.stages) == ("./ckpt", "n", ["a", "b"], 2, 3)
    args = parse(["models", "alias", "n", "prod", "v2"])
    assert (args.name, args.alias, args.version) == ("n", "prod", "v2")
    args = parse(["models", "replicas", "n", "2"])
    assert args.replicas == 2
    assert parse(["models", "list", "--json"]).json
    assert parse(["workers", "--json", "--gateway", "g:1"]).gateway == "g:1"
    args = parse(["placement", "n", "--json", "--version", "v1"])
    assert (args.name, args.version, args.json) == ("n", "v1", True)
    args = parse(["embed", "--model", "e", "one", "two"])
    assert args.texts == ["one", "two"]


def test_help_lists_every_command(capsys) -> None:
    assert _exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("up", "models", "generate", "embed", "workers", "placement", "make-checkpoint"):
        assert command in out


def test_placement_json_is_inclusive() -> None:
    placement = types.Placement("m", "v1", 7, [
        types.PlacedStage(0, 2, [types.Replica("w0", "a:1", True)]),
        types.PlacedStage(2, 4, [types.Replica("w1", "a:2", True), types.Replica("w2", "a:3", False)]),
    ], "ready")
    out = cli.placement_json(placement)
    assert out["epoch"] == 7
    assert [(s["first_layer"], s["last_layer"], s["worker_id"]) for s in out["stages"]] == [(0, 1, "w0"), (2, 3, "w1")]
    assert len(out["stages"][1]["replicas"]) == 2


def test_make_checkpoint_is_delegated(tmp_path, capsys) -> None:
    out = tmp_path / "ckpt"
    assert cli.main(["make-checkpoint", str(out), "--layers", "2", "--hidden", "32", "--vocab", "300"]) == 0
    assert (out / "config.json").exists() and list(out.glob("*.safetensors"))
    assert _exit_code(["make-checkpoint", str(out), "--layers", "0"]) == 2
