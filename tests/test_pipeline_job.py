"""The captioning job (pipelines/caption.py) end to end on files."""

from __future__ import annotations

import glob
import json
import os
import shutil

import pytest
from helpers import IMG, printed_summary

from pipelines.caption import input_folder, parse_args, run


def read_jsonl(prefix: str) -> list:
    rows = []
    for path in sorted(glob.glob(prefix + "*.jsonl")):
        with open(path, encoding="utf-8") as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


@pytest.fixture()
def dataset(tmp_path, image_dir):
    """A JSONL dataset with relative image paths, one bad line and one missing image."""
    shutil.copytree(image_dir, tmp_path / "imgs")
    lines = [
        json.dumps({"id": 1, "text": f"{IMG}a red thing", "images": ["imgs/red.jpg"]}),
        json.dumps({"id": 2, "text": f"{IMG}{IMG}", "images": ["imgs/blue.png", str(tmp_path / "imgs/green.jpg")]}),
        json.dumps({"id": 3, "text": "plain"}),
        json.dumps({"id": 4, "text": f"{IMG}", "images": ["imgs/missing.jpg"]}),
        "{not json",
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_job_writes_captions_and_failures(dataset, blip_dir, capsys):
    out, failed = str(dataset / "out" / "captioned"), str(dataset / "out" / "failed")
    run([
        "--input", str(dataset / "*.jsonl"), "--output", out, "--failed_output", failed,
        "--hf_img2seq", blip_dir, "--max_new_tokens", "4", "--caption_num", "2", "--keep_candidate_mode", "all",
        "--num_shards", "1",
    ])  # fmt: skip
    rows = read_jsonl(out)
    assert sorted(r["id"] for r in rows) == [1, 1, 1, 2, 2, 2, 3]
    generated = [r for r in rows if r["text"].endswith("<|__dj__eoc|>")]
    assert len(generated) == 4 and all(r["images"] for r in generated)
    bad = read_jsonl(failed)
    assert len(bad) == 2
    missing, line = sorted((b["error"] for b in bad), key=lambda reason: not reason.startswith("image"))
    assert "imgs/missing.jpg" in missing and "file not found" in missing
    assert line.startswith(f"{dataset / 'data.jsonl'}:5: invalid JSON")
    summary = printed_summary(capsys.readouterr().out)
    assert summary["samples_in"] == 4 and summary["samples_failed"] == 1 and summary["images_captioned"] == 3


def test_job_without_failed_output_fails_clearly(dataset, blip_dir):
    os.remove(dataset / "data.jsonl")
    (dataset / "d.jsonl").write_text(json.dumps({"text": IMG, "images": ["imgs/missing.jpg"]}) + "\n")
    with pytest.raises(Exception, match="file not found"):
        run(
            [
                "--input",
                str(dataset / "d.jsonl"),
                "--output",
                str(dataset / "o"),
                "--hf_img2seq",
                blip_dir,
                "--max_new_tokens",
                "2",
            ]
        )


def test_input_folder():
    assert input_folder("/data/x/*.jsonl") == "/data/x"
    assert input_folder("gs://b/d/part-*/f.jsonl") == "gs://b/d"
    assert input_folder("data.jsonl") == "."
    assert input_folder("/a/b/c.jsonl") == "/a/b"


RECIPE = """
project_name: demo
dataset_path: {data}
export_path: {export}
np: 4
text_keys: 'content'
image_key: 'pics'
image_special_token: '<img>'
eoc_special_token: '<eoc>'
process:
  - image_captioning_mapper:
      hf_img2seq: {model}
      caption_num: 2
      keep_candidate_mode: 'all'
      keep_original_sample: false
      mem_required: '16GB'
{extra}
"""


def _recipe(tmp_path, image_dir, blip_dir, extra=""):
    data = tmp_path / "data.jsonl"
    rows = [{"content": "<img>a cat<eoc>", "pics": [str(image_dir / "red.jpg")]},
            {"content": "<img> one <eoc> <img> two", "pics": [str(image_dir / "blue.jpg"), str(image_dir / "green.jpg")]},
            {"content": "text only", "pics": []}]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(data=data, export=tmp_path / "out" / "result.jsonl", model=blip_dir, extra=extra))
    return recipe


def test_unchanged_data_juicer_recipe_runs(tmp_path, image_dir, blip_dir):
    recipe = _recipe(tmp_path, image_dir, blip_dir)
    run(["--recipe", str(recipe), "--max_new_tokens", "3"])
    rows = [json.loads(line) for line in open(tmp_path / "out" / "result.jsonl")]
    assert len(rows) == 4  # keep_original_sample false, 'all' with 2 candidates, 2 captioned samples
    assert all(set(r) == {"content", "pics"} for r in rows)
    texts = sorted(r["content"] for r in rows)
    assert all(t.startswith("<img> ") and t.endswith(" <eoc>") for t in texts[:2])
    assert sum(t.count("<eoc>") == 2 for t in texts) == 2


def test_recipe_with_other_ops_is_refused_by_name(tmp_path, image_dir, blip_dir):
    from pipelines.recipe import RecipeError

    recipe = _recipe(tmp_path, image_dir, blip_dir, extra="  - language_id_score_filter:\n      lang: en")
    with pytest.raises(RecipeError, match="the recipe also has: language_id_score_filter"):
        run(["--recipe", str(recipe)])
    run(["--recipe", str(recipe), "--skip_other_ops", "--max_new_tokens", "2"])
    assert len(open(tmp_path / "out" / "result.jsonl").readlines()) == 4


def test_recipe_with_unknown_mapper_argument_is_refused(tmp_path, image_dir, blip_dir):
    from pipelines.recipe import RecipeError

    recipe = _recipe(tmp_path, image_dir, blip_dir)
    recipe.write_text(recipe.read_text().replace("mem_required: '16GB'", "beam_size: 3"))
    with pytest.raises(RecipeError, match=r"arguments beamcap does not know: \['beam_size'\]"):
        run(["--recipe", str(recipe)])


def test_a_recipe_of_nested_aliases_is_refused_before_it_expands(tmp_path):
    """Ten lines of aliases ("billion laughs") expand to 10**9 values: refused from the YAML's node graph, which
    holds each alias once; a recipe using a few aliases loads as before."""
    from pipelines.recipe import RecipeError, load_recipe

    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"{n}: &{n} [{', '.join(['*' + p] * 10)}]" for p, n in zip("abcdefgh", "bcdefghi", strict=True)]
    bomb = tmp_path / "laughs.yaml"
    bomb.write_text("\n".join(levels) + "\ndataset_path: *i\n")
    with pytest.raises(RecipeError, match="more than 100000 values once its YAML aliases"):
        load_recipe(str(bomb))
    fine = tmp_path / "fine.yaml"
    fine.write_text(
        "dataset_path: &data in.jsonl\nexport_path: out.jsonl\nprocess:\n  - image_captioning_mapper:\n"
        "      hf_img2seq: beamcap-demo\n      prompt: *data\n"
    )
    assert load_recipe(str(fine))["prompt"] == "in.jsonl"


def test_parquet_in_and_out(tmp_path, image_dir, blip_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([
        {"text": f"{IMG}x", "images": ["red.jpg"], "n": 1},
        {"text": f"{IMG}{IMG}", "images": ["blue.png", "green.jpg"], "n": 2},
        {"text": "none", "images": [], "n": 3},
    ])  # fmt: skip
    pq.write_table(table, tmp_path / "in.PARQUET")  # the suffix in any case, as Beam reads compression suffixes
    run(
        [
            "--input",
            str(tmp_path / "in.PARQUET"),
            "--output",
            str(tmp_path / "o"),
            "--output_format",
            "parquet",
            "--image_base_dir",
            str(image_dir),
            "--hf_img2seq",
            blip_dir,
            "--max_new_tokens",
            "3",
            "--num_shards",
            "1",
        ]
    )
    (path,) = glob.glob(str(tmp_path / "o-*.parquet"))
    rows = pq.read_table(path).to_pylist()
    assert sorted(r["n"] for r in rows) == [1, 1, 2, 2, 3]
    assert pq.read_schema(path) == table.schema


@pytest.mark.parametrize(("output", "expected"), [("o.parquet", "parquet"), ("O.Parquet", "parquet"), ("o", "jsonl")])
def test_the_output_format_follows_the_output_suffix_in_any_case(tmp_path, output, expected):
    args, _ = parse_args(["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / output)])
    assert args.output_format == expected


def test_recipe_output_flag_overrides_export_path_as_a_prefix(tmp_path, image_dir, blip_dir):
    recipe = _recipe(tmp_path, image_dir, blip_dir)
    run(["--recipe", str(recipe), "--output", str(tmp_path / "mine"), "--num_shards", "1", "--max_new_tokens", "2"])
    assert not (tmp_path / "out" / "result.jsonl").exists()
    assert len(read_jsonl(str(tmp_path / "mine"))) == 4


def test_parquet_output_from_jsonl_sends_what_does_not_fit_its_schema_to_failed(tmp_path, image_dir, blip_dir):
    """The schema comes from the samples on the first 200 lines (a bad line is left out of it); a later sample
    with a field the schema lacks, or a value of another type, goes to the failed output and the job goes on."""
    import pyarrow.parquet as pq

    lines = [
        "not json",
        json.dumps({"id": 1, "text": f"{IMG}x", "images": ["red.jpg"], "meta": {"w": 1}}),  # no "h": it is null
        *(json.dumps({"id": 100 + i, "text": "no image", "images": [], "meta": {"w": i, "h": i}}) for i in range(198)),
        json.dumps({"id": 2, "text": "no image", "images": [], "meta": {"w": 2}}),
        json.dumps({"id": 3, "text": "no image", "images": [], "meta": {"w": "wide"}}),
        json.dumps({"id": 4, "text": "no image", "images": [], "meta": {"w": 4}, "new": True}),
        json.dumps({"id": 5, "text": "no image", "images": []}),
        json.dumps({"id": 6, "text": "no image", "images": [], "meta": {"w": 2.5}}),
        json.dumps({"id": 7, "text": "no image", "images": [], "meta": {"w": 7, "d": 1}}),
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    out, failed = str(tmp_path / "o"), str(tmp_path / "f")
    result = run(["--input", str(tmp_path / "in.jsonl"), "--output", out, "--output_format", "parquet",
                  "--failed_output", failed, "--image_base_dir", str(image_dir), "--hf_img2seq", blip_dir,
                  "--max_new_tokens", "3", "--num_shards", "1"])  # fmt: skip
    (path,) = glob.glob(out + "-*.parquet")
    rows = [r for r in pq.read_table(path).to_pylist() if r["id"] < 100]
    assert sorted(((r["id"], r["meta"]) for r in rows), key=lambda row: row[0]) == [
        (1, {"w": 1, "h": None}),
        (1, {"w": 1, "h": None}),
        (2, {"w": 2, "h": None}),
        (5, None),
    ]  # dicts compared whatever the order of their keys (it differs between pyarrow versions)
    errors = {r["sample"]["id"] if isinstance(r["sample"], dict) else "line": r["error"] for r in read_jsonl(failed)}
    assert "invalid JSON" in errors["line"]
    assert "cannot be written to Parquet: a value does not fit the Parquet schema" in errors[3]
    assert "cannot be written to Parquet: its fields ['new'] are not in the Parquet schema" in errors[4]
    assert "cannot be written to Parquet: the values of ['meta'] would change to fit" in errors[6] and 7 in errors
    from apache_beam.metrics.metric import MetricsFilter

    unfit = result.metrics().query(MetricsFilter().with_name("records_unfit"))["counters"]
    assert sum(c.committed or c.attempted for c in unfit) == 4


@pytest.mark.parametrize(
    "lines, message",
    [
        ("not json\n[1, 2]\n", r"none of the first lines of .* \(up to 200, or 16 MiB\) is a JSON object"),
        ('{"text": "a", "w": 1}\n{"text": "b", "w": "x"}\n', "give no one Parquet schema .*--output_format jsonl"),
    ],
)
def test_parquet_output_needs_one_schema_among_the_first_lines(tmp_path, blip_dir, lines, message):
    from pipelines.options import UserError

    (tmp_path / "in.jsonl").write_text(lines)
    with pytest.raises(UserError, match=message):
        run(["--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.parquet"), "--hf_img2seq", blip_dir])


def test_the_parquet_schema_is_read_from_a_bounded_head_of_the_input(tmp_path, monkeypatch):
    """The launcher holds the head it takes the schema from parsed: at most SCHEMA_BYTES of lines (at least one),
    so 200 lines of a million tiny values each cannot exhaust it. A line past the bound is not part of the schema."""
    import pyarrow as pa

    from pipelines import caption

    monkeypatch.setattr(caption, "SCHEMA_BYTES", 100)
    first = '{"text": "a", "w": [' + ", ".join(["1"] * 40) + "]}\n"  # 140 bytes: taken whole, alone
    (tmp_path / "in.jsonl").write_text(first + '{"text": "b", "w": "no list"}\n')
    assert caption.parquet_schema([str(tmp_path / "in.jsonl")]).field("w").type == pa.list_(pa.int64())
    (tmp_path / "in.jsonl").write_text('{"text": "a", "w": 1}\n' * 4 + '{"text": "b", "w": "x"}\n')  # 5th: 120+
    assert str(caption.parquet_schema([str(tmp_path / "in.jsonl")]).field("w").type) == "int64"


def test_hostile_parquet_inputs_fail_alone_beside_good_files(tmp_path, image_dir, blip_dir, capsys):
    """One glob matching good and bad Parquet files and a JSONL file: each file is read by its own name; a file
    that is not Parquet, cut short, has a column twice, or rows that are too large or do not convert, gives failure
    records naming the file and row, and everything else is captioned (Beam's Parquet reader failed the job)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "in"
    folder.mkdir()
    good = pa.Table.from_pylist([{"text": f"{IMG}x", "images": ["red.jpg"], "n": n} for n in (1, 2)])
    pq.write_table(good, folder / "part-0.snappy.parquet")
    whole = (folder / "part-0.snappy.parquet").read_bytes()
    (folder / "cut.parquet").write_bytes(whole[: len(whole) // 2])
    (folder / "not.parquet").write_bytes(b"text, images\n")
    pq.write_table(
        pa.Table.from_arrays([pa.array(["a"]), pa.array([["red.jpg"]]), pa.array([5])], ["text", "images", "images"]),
        folder / "twice.parquet",
    )
    stamps = pa.array([0, 2**62], pa.timestamp("us"))  # the second is past year 9999: Python cannot hold it
    pq.write_table(pa.table({"text": ["ok", "late"], "images": [[], []], "when": stamps}), folder / "late.parquet")
    pq.write_table(
        pa.table({"text": ["small", "x" * 300_000, "small2"], "images": [[], [], []]}), folder / "big.parquet"
    )
    (folder / "more.jsonl").write_text(json.dumps({"text": f"{IMG}y", "images": ["blue.png"], "n": 3}) + "\n")
    out, failed = tmp_path / "o", tmp_path / "f"
    run([
        "--input", str(folder / "*"), "--output", str(out), "--failed_output", str(failed),
        "--image_base_dir", str(image_dir), "--hf_img2seq", blip_dir, "--max_new_tokens", "2",
        "--num_shards", "1", "--max_line_bytes", "200000",
    ])  # fmt: skip
    captioned = read_jsonl(str(out))
    assert sorted(r.get("n", 0) for r in captioned) == [0, 0, 0, 1, 1, 2, 2, 3, 3]  # 3 passed through: no images
    assert sorted(r["text"] for r in captioned if "n" not in r) == ["ok", "small", "small2"]
    errors = sorted(r["error"] for r in read_jsonl(str(failed)))
    assert len(errors) == 5, errors
    by_file = {e.split(":", 1)[0].rsplit("/", 1)[1]: e for e in errors}
    assert by_file["big.parquet"].startswith(f"{folder}/big.parquet:2: the row is ")
    assert "over the --max_line_bytes limit of 200000" in by_file["big.parquet"]
    assert by_file["cut.parquet"].startswith(f"{folder}/cut.parquet:1: cannot read as Parquet: ")
    assert by_file["not.parquet"].startswith(f"{folder}/not.parquet:1: cannot read as Parquet: ")
    assert by_file["twice.parquet"] == (
        f"{folder}/twice.parquet:1: it has more than one column named ['images']: which one is meant is unclear"
    )
    assert by_file["late.parquet"].startswith(f"{folder}/late.parquet:2: a value does not convert: ")
    summary = printed_summary(capsys.readouterr().out)
    assert summary["lines_unparseable"] == 5 and summary["samples_in"] == 6
    assert summary["lines_read"] == summary["samples_in"] + summary["lines_unparseable"]


def test_a_folder_as_input_is_refused_with_the_files_to_pass(tmp_path, blip_dir):
    from pipelines.options import UserError

    (tmp_path / "data.parquet").mkdir()
    with pytest.raises(UserError, match=r"is a folder .*: pass the files in it, such as '.*/data.parquet/\*.parquet'"):
        run(["--input", str(tmp_path / "data.parquet"), "--output", str(tmp_path / "o"), "--hf_img2seq", blip_dir])
