"""`otmel index / link / eval / explain / report` end to end on a tiny KG with a randomly initialised model,
and the Ray index builder (slow: starts a local Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from otmel.cli import main
from otmel.data.manifest import shard_infos
from otmel.data.shards import iter_shard
from otmel.link import EntityIndex, build_index
from otmel.link.explain import compute_explanation
from tests.test_link import FIELDS, ckpt, index_dir, kg, linker, make_checkpoint  # noqa: F401 (fixtures)

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def mention(kg: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:  # noqa: F811
    sample = next(iter_shard(kg / shard_infos(kg, "test")[0].name))
    meta = json.loads(sample["json"])
    path = tmp_path_factory.mktemp("mention") / "m.jpg"
    path.write_bytes(sample["m.jpg"])
    return {"text": meta["sentence"], "mention": meta["mention"], "image": str(path), "answer": meta["answer"]}


def test_help_lists_the_linking_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("index", "link", "eval", "explain", "report"):
        assert cmd in out


def test_index_then_link_json(ckpt: Path, kg: Path, mention: dict, tmp_path: Path,  # noqa: F811
                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "idx"
    assert main(["index", "--checkpoint", str(ckpt), "--kg", str(kg), "--out", str(out), "--workers", "0",
                 "--no-progress"]) == 0
    assert "indexed 100 entities" in capsys.readouterr().out
    assert main(["link", "--checkpoint", str(ckpt), "--index", str(out), "--text", mention["text"], "--mention",
                 mention["mention"], "--image", mention["image"], "-k", "5", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["results"]) == 5 and res["mode"] == "two-stage"
    top = res["results"][0]
    assert top["rank"] == 1 and top["qid"].startswith("Q") and {"S_O", "S_F", "S_T", "S_V"} <= set(top)
    assert main(["link", "--checkpoint", str(ckpt), "--index", str(out), "--text", mention["text"], "--mention",
                 mention["mention"], "--mode", "exhaustive", "-k", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["rank", "qid", "S_O"] and len(table) == 4


def test_link_errors_exit_2_with_a_message(ckpt: Path, index_dir: Path, tmp_path: Path,  # noqa: F811
                                           capsys: pytest.CaptureFixture[str]) -> None:
    base = ["link", "--checkpoint", str(ckpt), "--index", str(index_dir), "--text", "Ada wrote."]
    assert main([*base, "--mention", " "]) == 2
    assert "mention is empty" in capsys.readouterr().err
    bad = tmp_path / "x.png"
    bad.write_bytes(b"nope")
    assert main([*base, "--mention", "Ada", "--image", str(bad)]) == 2
    assert "x.png: not a readable image" in capsys.readouterr().err
    assert main([*base, "--mention", "Grace", "-k", "1"]) == 0
    assert "does not occur in the text" in capsys.readouterr().err
    other = make_checkpoint(tmp_path / "other", seed=9)
    assert main(["link", "--checkpoint", str(other), "--index", str(index_dir), "--text", "Ada", "--mention",
                 "Ada"]) == 2
    err = capsys.readouterr().err
    assert "sha256" in err and "rebuild it" in err
    assert main(["link", "--checkpoint", str(tmp_path / "nope"), "--index", str(index_dir), "--text", "Ada",
                 "--mention", "Ada"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_eval_prints_both_modes_and_agreement(ckpt: Path, kg: Path, index_dir: Path, tmp_path: Path,  # noqa: F811
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(ckpt), "--shards", str(kg), "--split", "test", "--candidates", "100",
                 "--index", str(index_dir), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "exhaustive" in text and "two-stage" in text and "top-1 agreement 100.00%" in text
    res = json.loads(out.read_text())
    assert res["agreement_top1"] == 1.0 and set(res["modes"]) == {"exhaustive", "two-stage"}
    assert main(["eval", "--checkpoint", str(ckpt), "--shards", str(kg), "--mode", "exhaustive", "--limit",
                 "5"]) == 0
    assert "5 mentions x 100 entities" in capsys.readouterr().out


def test_explain_writes_a_png_with_both_assignments(ckpt: Path, index_dir: Path, linker, mention: dict,  # noqa: F811
                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "fig.png"
    assert main(["explain", "--checkpoint", str(ckpt), "--index", str(index_dir), "--text", mention["text"],
                 "--mention", mention["mention"], "--image", mention["image"], "--entity", mention["answer"],
                 "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 20_000
    assert mention["answer"] in capsys.readouterr().out
    ex = compute_explanation(linker, mention["text"], mention["mention"], mention["image"])
    assert ex.fusion is not None and ex.matching is not None and ex.entity.rank == 1
    for pair in (ex.fusion, ex.matching):
        assert pair.attention.shape == pair.plan.shape == (len(pair.rows), len(pair.cols))
        assert pair.plan.sum(1) == pytest.approx(1.0, abs=1e-4)
        assert pair.attention.sum(1) == pytest.approx(1.0, abs=1e-4)
    assert ex.fusion.used == "OT plan" and ex.fusion.cols[0] == "cls" and len(ex.fusion.cols) == 5
    no_image = compute_explanation(linker, mention["text"], mention["mention"])
    assert no_image.fusion is None and no_image.matching is not None


def test_report_writes_markdown_and_figures(ckpt: Path, kg: Path, tmp_path: Path,  # noqa: F811
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    from otmel.link.report import report

    md = report([ckpt], out, shards=kg, timing_limit=6, repeats=1)
    text = md.read_text()
    assert "H@1 by text length" in text and "short (<= 20 tokens)" in text and "long (> 20 tokens)" in text
    for label in ("OT-MEL (OT)", "ATT (A1)", "OT-MEL (KD)"):
        assert label in text
    for name in ("fig6_token_length.png", "table4_prediction_time.png"):
        assert (out / name).read_bytes()[:8] == PNG
    data = json.loads((out / "report.json").read_text())
    assert set(data["table4"]["variants"]) == {"OT", "A1", "KD"} and "OT/ATT" in data["table4"]["ratios"]
    n = sum(b["mentions"] for b in next(iter(data["fig6"].values())).values())
    assert n == json.loads((kg / "manifest.json").read_text())["counts"]["test"]
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_ray_index_builder_equals_in_process(ckpt: Path, kg: Path, index_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    """Two Ray actors, one task per KG shard (3 shards), against the in-process build."""
    ray_built = build_index(ckpt, kg, tmp_path / "ray", workers=2, progress=False)
    local = EntityIndex.load(index_dir)
    assert ray_built.qids == local.qids and ray_built.meta["build"]["workers"] == 2
    for name in FIELDS:
        a, b = getattr(ray_built.features, name), getattr(local.features, name)
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert EntityIndex.load(tmp_path / "ray").checkpoint_sha256 == local.checkpoint_sha256


@pytest.mark.parametrize("variant", ["KD", "A1"])
def test_explain_of_attention_models_marks_attention_as_used(variant: str, kg: Path, mention: dict,  # noqa: F811
                                                               tmp_path: Path) -> None:
    from otmel.link import Linker

    lk = Linker.from_checkpoint(make_checkpoint(tmp_path / variant, seed=4, variant=variant), kg=kg)
    ex = compute_explanation(lk, mention["text"], mention["mention"], mention["image"])
    assert ex.fusion is not None and ex.matching is not None
    for pair in (ex.fusion, ex.matching):
        assert pair.used == "attention"
        assert pair.plan.sum(1) == pytest.approx(1.0, abs=1e-4)
        assert pair.attention.sum(1) == pytest.approx(1.0, abs=1e-4)
        assert not torch.allclose(torch.from_numpy(pair.plan), torch.from_numpy(pair.attention), atol=1e-3)
