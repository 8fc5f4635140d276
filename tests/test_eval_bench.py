"""`llmcore eval bench`: CMMLU / C-Eval / generic multiple-choice scoring as lm-eval scores it.

References: lm-evaluation-harness itself (its own CMMLU template, run on the exported HF model), a
direct no-cache forward for the KV-cache scoring, and a model built so that one letter must win.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmcore.checkpoint import save_model
from llmcore.errors import DataError, LLMCoreError
from llmcore.eval_bench import (
    FORMATS,
    Question,
    build_context,
    build_requests,
    encode_pair,
    eval_bench,
    load_task,
    run_bench,
    score_batch,
)
from llmcore.model import LLM, ModelConfig

CMMLU_HEADER = ["", "Question", "A", "B", "C", "D", "Answer"]
CEVAL_HEADER = ["id", "question", "A", "B", "C", "D", "answer"]


def tiny(seed: int = 0, **overrides) -> LLM:
    torch.manual_seed(seed)
    return LLM(ModelConfig.from_preset("tiny", **{"initializer_range": 0.2, **overrides})).eval()


def make_run(root: Path, model: LLM, minimind_tok_dir: Path) -> Path:
    run = root / "run"
    save_model(model, run / "checkpoints" / "step-1")
    (run / "checkpoints" / "latest").write_text("step-1\n")
    shutil.copytree(minimind_tok_dir, run / "tokenizer")
    return run


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


QUESTIONS = [
    (
        "在农业生产中被当作极其重要的劳动对象发挥作用，最主要的不可替代的基本生产资料是",
        "农业生产工具",
        "土地",
        "劳动力",
        "资金",
        "B",
    ),
    ("下列作物中属于豆科的是", "小麦", "水稻", "大豆", "玉米", "C"),
    ("土壤酸碱度通常用什么表示", "pH", "电导率", "有机质", "含水量", "A"),
    ("光合作用主要发生在植物的", "根", "茎", "叶绿体", "花", "C"),
    ("下列哪种肥料属于氮肥", "尿素", "过磷酸钙", "氯化钾", "石灰", "A"),
    ("水稻原产于", "欧洲", "中国", "非洲", "美洲", "B"),
]


def cmmlu_dir(root: Path) -> Path:
    data = root / "cmmlu"
    rows = [[str(i), *q] for i, q in enumerate(QUESTIONS)]
    write_csv(data / "test" / "agronomy.csv", CMMLU_HEADER, rows[:4])
    write_csv(data / "dev" / "agronomy.csv", CMMLU_HEADER, rows[4:] + rows[:3])
    write_csv(data / "test" / "anatomy.csv", CMMLU_HEADER, [[str(i), *q] for i, q in enumerate(QUESTIONS[2:5])])
    write_csv(data / "dev" / "anatomy.csv", CMMLU_HEADER, rows[:5])
    return data


# ---------------------------------------------------------------- prompts and reading


def test_cmmlu_prompt_is_lm_evals_template() -> None:
    q = Question("agronomy", " 水稻原产于 ", ["欧洲", "中国", "非洲", "美洲"], 1)
    shot = Question("agronomy", "下列哪种肥料属于氮肥", ["尿素", "过磷酸钙", "氯化钾", "石灰"], 0)
    text = build_context(FORMATS["cmmlu"], q, [shot])
    assert text == (
        "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
        "下列哪种肥料属于氮肥\nA. 尿素\nB. 过磷酸钙\nC. 氯化钾\nD. 石灰\n答案： A\n\n"
        "水稻原产于\nA. 欧洲\nB. 中国\nC. 非洲\nD. 美洲\n答案："
    )
    ceval = build_context(FORMATS["ceval"], Question("law", "q", ["a", "b", "c", "d"], 0), [])
    assert ceval.startswith("以下是中国关于法学的单项选择题，请选出其中的正确答案。\n\n")


def test_encode_pair_moves_trailing_space_and_splits_the_whole(minimind_tok_dir: Path) -> None:
    from llmcore.data_prep.tokenizer import load_tokenizer

    tok = load_tokenizer(minimind_tok_dir)
    ctx, cont = encode_pair(tok, "答案： ", "A")
    assert ctx == tok.encode("答案：") and ctx + cont == tok.encode("答案： A")


def test_reads_official_layouts_and_refuses_bad_files(tmp_path: Path) -> None:
    data = cmmlu_dir(tmp_path)
    qs, dev = load_task("cmmlu", data)
    assert sorted(qs) == ["agronomy", "anatomy"] and len(qs["agronomy"]) == 4 and len(dev["agronomy"]) == 5
    assert qs["agronomy"][1].answer == 2 and qs["agronomy"][1].choices[2] == "大豆"

    cev = tmp_path / "ceval"
    write_csv(cev / "val" / "law_val.csv", CEVAL_HEADER, [["0", "q1", "a", "b", "c", "d", "D"]])
    write_csv(cev / "dev" / "law_dev.csv", CEVAL_HEADER + ["explanation"], [["0", "q0", "a", "b", "c", "d", "A", "x"]])
    qs, dev = load_task("ceval", cev)
    assert qs["law"][0].answer == 3 and dev["law"][0].answer == 0

    bad = tmp_path / "bad"
    write_csv(
        bad / "test" / "agronomy.csv", ["", "Question", "A", "B", "C", "Answer"], [["0", "q", "a", "b", "c", "A"]]
    )
    with pytest.raises(DataError, match=r"agronomy\.csv:1: missing column\(s\) D"):
        load_task("cmmlu", bad)
    write_csv(
        bad / "test" / "agronomy.csv",
        CMMLU_HEADER,
        [["0", "q", "a", "b", "c", "d", "A"], ["1", "q", "a", "b", "c", "d", "E"]],
    )
    with pytest.raises(DataError, match=r"agronomy\.csv:3: answer 'E' is not one of A, B, C, D"):
        load_task("cmmlu", bad)
    write_csv(bad / "test" / "agronomy.csv", CMMLU_HEADER, [["0", "q", "a", "b", "c", "d", "A"]])
    write_csv(bad / "test" / "not_a_subject.csv", CMMLU_HEADER, [["0", "q", "a", "b", "c", "d", "A"]])
    with pytest.raises(DataError, match=r"not_a_subject\.csv: unknown cmmlu subject 'not_a_subject'"):
        load_task("cmmlu", bad)

    mc = tmp_path / "mc.jsonl"
    mc.write_text(
        json.dumps({"question": "q", "choices": ["x", "y"], "answer": 1})
        + "\n"
        + json.dumps({"question": "q", "choices": ["x"], "answer": 0})
        + "\n"
    )
    with pytest.raises(DataError, match=r"mc\.jsonl:2: choices must be a list"):
        load_task("mc", mc)
    with pytest.raises(LLMCoreError, match="--task must be one of"):
        load_task("mmlu", mc)


# ---------------------------------------------------------------- scoring


def test_kv_cache_scoring_equals_a_direct_forward(minimind_tok_dir: Path) -> None:
    """Multi-token continuations, batched with left padding, against one plain forward per choice."""
    from llmcore.data_prep.tokenizer import load_tokenizer

    tok = load_tokenizer(minimind_tok_dir)
    model = tiny(seed=3)
    qs = [
        Question("all", "天空是什么颜色", ["蓝色的天空", "红", "一种非常长的颜色名称"], 0),
        Question("all", "一加一等于几？请回答", ["二", "三个苹果"], 1),
    ]
    reqs = build_requests(FORMATS["mc"], tok, qs, [], 0)
    assert max(len(c) for r in reqs for c in r.continuations) > 1
    got = score_batch(model, reqs)
    for r, lls in zip(reqs, got):
        for cont, ll in zip(r.continuations, lls):
            ids = torch.tensor([r.context + cont])
            with torch.no_grad():
                lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            want = sum(float(lp[len(r.context) - 1 + k, t]) for k, t in enumerate(cont))
            assert ll == pytest.approx(want, abs=1e-4)


def test_a_model_built_to_prefer_one_letter_scores_exactly_that(tmp_path: Path, minimind_tok_dir: Path) -> None:
    """Residual branches zeroed: logits = norm(E[last]) @ E.T; give " C" the last token's direction."""
    from llmcore.data_prep.tokenizer import load_tokenizer

    tok = load_tokenizer(minimind_tok_dir)
    model = tiny(seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        last = tok.encode("答案：")[-1]
        (c_id,) = tok.encode(" C")
        e = model.embed_tokens.weight
        e[c_id] = e[last] / e[last].norm() * 50
    run = make_run(tmp_path, model, minimind_tok_dir)
    res = eval_bench(run, "cmmlu", cmmlu_dir(tmp_path), out=tmp_path / "out", progress=False)
    gold_c = {"agronomy": 2 / 4, "anatomy": 1 / 3}  # questions whose answer is C
    for subject, want in gold_c.items():
        assert res.subjects[subject].acc == pytest.approx(want)
    assert all(p["pred"] == 2 for p in res.predictions)
    assert res.overall.acc == pytest.approx(3 / 7) and res.overall.n == 7
    assert res.overall.acc_norm == res.overall.acc  # letter choices all have length 1
    summary = json.loads((tmp_path / "out" / "results.json").read_text())
    assert summary["overall"]["acc"] == pytest.approx(3 / 7) and summary["chance"] == pytest.approx(0.25)
    assert (tmp_path / "out" / "results.png").stat().st_size > 0
    assert len((tmp_path / "out" / "predictions.jsonl").read_text().splitlines()) == 7
    # --out is not replaced without --overwrite; --limit and --subjects select.
    with pytest.raises(LLMCoreError, match="not empty"):
        eval_bench(run, "cmmlu", cmmlu_dir(tmp_path), out=tmp_path / "out", progress=False)
    res = eval_bench(
        run,
        "cmmlu",
        tmp_path / "cmmlu",
        out=tmp_path / "out",
        overwrite=True,
        limit=2,
        subjects=["agronomy"],
        shots=3,
        progress=False,
    )
    assert list(res.subjects) == ["agronomy"] and res.overall.n == 2
    with pytest.raises(LLMCoreError, match="--subjects: law not in the data"):
        eval_bench(run, "cmmlu", tmp_path / "cmmlu", subjects=["law"], progress=False)
    with pytest.raises(LLMCoreError, match="--shots must be in 0..5"):
        eval_bench(run, "cmmlu", tmp_path / "cmmlu", shots=6, progress=False)


def test_acc_norm_divides_by_choice_length(minimind_tok_dir: Path) -> None:
    from llmcore.data_prep.tokenizer import load_tokenizer

    tok = load_tokenizer(minimind_tok_dir)
    qs = {"all": [Question("all", "一加一", ["二二二二二二二二", "三"], 0)]}
    res = run_bench(tiny(seed=2), tok, "mc", qs, {}, progress=False)
    lls = res.predictions[0]["loglikelihoods"]
    assert res.predictions[0]["pred"] == max(range(2), key=lambda j: lls[j])
    assert res.predictions[0]["pred_norm"] == max(range(2), key=lambda j: lls[j] / len(qs["all"][0].choices[j]))


# ---------------------------------------------------------------- parity with lm-eval


def test_same_choices_and_accuracy_as_lm_eval(tmp_path: Path, minimind_tok_dir: Path, monkeypatch) -> None:
    """lm-eval 0.4 with its own CMMLU template, on the exported HF model, 2-shot: the same choice
    log-likelihoods (1e-4), predictions and accuracy as `llmcore eval bench`."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a test extra (pip install -e '.[test]')")
    from llmcore.hf_export import export_hf

    for var, sub in (("HF_HOME", "hf"), ("HF_DATASETS_CACHE", "hfds")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # A one-process DeepSpeed run earlier in the session leaves its rendezvous variables set; lm-eval's
    # accelerate would then try to join that process group.
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = tiny(seed=4)
    run = make_run(tmp_path, model, minimind_tok_dir)
    hf = export_hf(run, tmp_path / "hf_model")
    data = cmmlu_dir(tmp_path)
    template = Path(lm_eval.__file__).parent / "tasks" / "cmmlu" / "_default_template_yaml"
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "fixture.yaml").write_text(
        f"include: {template}\n"
        "task: fixture_cmmlu_agronomy\n"
        "dataset_path: csv\n"
        "dataset_name: null\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {data / 'test' / 'agronomy.csv'}\n"
        f"    dev: {data / 'dev' / 'agronomy.csv'}\n"
        '"description": "以下是关于农学的单项选择题，请直接给出正确答案的选项。\\n\\n"\n',
        encoding="utf-8",
    )
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(
        model="hf",
        model_args=f"pretrained={hf},dtype=float32",
        tasks=["fixture_cmmlu_agronomy"],
        num_fewshot=2,
        batch_size=1,
        log_samples=True,
        task_manager=TaskManager(include_path=str(tasks)),
        device="cpu",
    )
    samples = out["samples"]["fixture_cmmlu_agronomy"]
    theirs = {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in samples}
    ours = eval_bench(run, "cmmlu", data, subjects=["agronomy"], shots=2, progress=False)
    assert len(theirs) == len(ours.predictions) == 4
    for i, p in enumerate(ours.predictions):
        assert p["loglikelihoods"] == pytest.approx(theirs[i], abs=1e-4)
        assert p["pred"] == max(range(4), key=lambda j: theirs[i][j])
    assert ours.overall.acc == pytest.approx(out["results"]["fixture_cmmlu_agronomy"]["acc,none"])
    assert ours.overall.acc_norm == pytest.approx(out["results"]["fixture_cmmlu_agronomy"]["acc_norm,none"])


# ---------------------------------------------------------------- getting the data


def test_download_benchmark_installs_the_official_layout(tmp_path: Path, monkeypatch) -> None:
    """The archive is unpacked safely and its `test/` + `dev/` layout becomes --out (download mocked)."""
    import zipfile

    from llmcore import eval_bench
    from llmcore.data_prep import download as dl

    def fake_download(dataset, file, out_dir, timeout=30.0, overwrite=False, progress=False):
        assert (dataset, file) == eval_bench.BENCHMARK_ARCHIVES["cmmlu"][:2]
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        path = Path(out_dir) / file
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("cmmlu_v1_0_1/test/agronomy.csv", ",Question,A,B,C,D,Answer\n0,q,a,b,c,d,A\n")
            zf.writestr("cmmlu_v1_0_1/dev/agronomy.csv", ",Question,A,B,C,D,Answer\n0,q,a,b,c,d,B\n")
        return path

    monkeypatch.setattr(dl, "download", fake_download)
    out = eval_bench.download_benchmark("cmmlu", tmp_path / "cmmlu")
    qs, dev = load_task("cmmlu", out)
    assert qs["agronomy"][0].answer == 0 and dev["agronomy"][0].answer == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cmmlu"]  # no temp dir left

    def evil_download(dataset, file, out_dir, timeout=30.0, overwrite=False, progress=False):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        path = Path(out_dir) / file
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("../../escape.csv", "x")
        return path

    monkeypatch.setattr(dl, "download", evil_download)
    with pytest.raises(LLMCoreError, match="refusing member"):
        eval_bench.download_benchmark("cmmlu", tmp_path / "other")
    assert not (tmp_path / "escape.csv").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["cmmlu"]


def test_download_benchmark_offline_is_one_line(tmp_path: Path) -> None:
    pytest.importorskip("modelscope")
    from llmcore.eval_bench import download_benchmark

    try:
        download_benchmark("ceval", tmp_path / "ceval", timeout=10)
    except LLMCoreError as err:
        assert "ModelScope" in str(err) and "\n" not in str(err)
    else:
        pytest.skip("this machine can reach ModelScope; the offline path cannot be tested here")
    assert not (tmp_path / "ceval").exists() and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the command


def test_cli_eval_bench_and_loss_default(tmp_path: Path, minimind_tok_dir: Path) -> None:
    from llmcore.cli import app

    run = make_run(tmp_path, tiny(), minimind_tok_dir)
    data = cmmlu_dir(tmp_path)
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "eval",
            "bench",
            "--ckpt",
            str(run),
            "--task",
            "cmmlu",
            "--data",
            str(data),
            "--shots",
            "1",
            "--subjects",
            "agronomy,anatomy",
            "--out",
            str(tmp_path / "res"),
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "cmmlu overall (1-shot): acc" in res.output and "(7 questions, chance 0.2500" in res.output
    assert json.loads((tmp_path / "res" / "results.json").read_text())["shots"] == 1
    bad = runner.invoke(
        app, ["eval", "bench", "--ckpt", str(run), "--task", "cmmlu", "--data", str(data), "--subjects", "law"]
    )
    assert isinstance(bad.exception, LLMCoreError) and "--subjects: law not in the data" in str(bad.exception)
    # `llmcore eval --ckpt ... --data ...` (no command named) is still the loss command.
    old = runner.invoke(app, ["eval", "--ckpt", str(run), "--data", str(tmp_path / "missing")])
    assert old.exit_code != 0 and "missing" in str(old.exception) + old.output
    helped = runner.invoke(app, ["eval", "--help"])
    assert helped.exit_code == 0 and "bench" in helped.output and "loss" in helped.output
    dl = runner.invoke(app, ["prep", "download", "--benchmark", "mmlu", "--out", str(tmp_path / "x")])
    assert isinstance(dl.exception, LLMCoreError) and "--benchmark must be one of cmmlu, ceval" in str(dl.exception)
