"""The README's bring-your-own-data path, command by command: COCO JSON -> TSV -> finetune ->
build-index -> query, on toy-world images in COCO's layout and format."""

import json

from typer.testing import CliRunner

from retriever.cli import app
from retriever.models import toyworld


def write_coco(root, split, n, seed):
    """COCO's layout: root/SPLIT/COCO_SPLIT_<id>.png and an annotations file captions_SPLIT.json."""
    folder = root / split
    folder.mkdir(parents=True)
    images, annotations = [], []
    large = [s for s in toyworld.all_scenes() if s.size == "large"]
    for i in range(n):
        scene = large[(seed * 31 + i * 7) % len(large)]
        image_id = seed * 100_000 + i
        name = f"COCO_{split}_{image_id:012d}.png"
        toyworld.render(scene, seed=image_id).save(folder / name)
        images.append({"id": image_id, "file_name": name, "width": 64, "height": 64})
        annotations.append({"id": image_id, "image_id": image_id, "caption": scene.caption.capitalize() + "."})
    path = root / f"captions_{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path, [(folder / im["file_name"], a["caption"]) for im, a in zip(images, annotations)]


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_coco_json_to_tsv_to_finetune_to_index_to_query(tmp_path):
    coco = tmp_path / "coco"
    train_json, _ = write_coco(coco, "train2014", 96, seed=1)
    val_json, val = write_coco(coco, "val2014", 32, seed=2)
    data, model, index = tmp_path / "data", tmp_path / "models" / "mine", tmp_path / "indexes" / "mine"

    run("corpus", "coco", "--annotations", train_json, "--images", coco, "--out", data / "train.tsv")
    run("corpus", "coco", "--annotations", val_json, "--images", coco, "--out", data / "val.tsv")
    summary = json.loads(
        run(
            "finetune",
            data / "train.tsv",
            "--val",
            data / "val.tsv",
            "--model",
            "toyworld",
            "--out",
            model,
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--workers",
            "0",
            "--json",
        )
    )
    assert summary["train"]["kept"] == 96 and summary["epochs"][0]["recall_at_1"] >= 0.9

    run(
        "corpus",
        "coco",
        "--annotations",
        train_json,
        "--annotations",
        val_json,
        "--captions-only",
        "--out",
        data / "captions.tsv",
    )
    run("build-index", data / "captions.tsv", "--model", f"local-dir:{model}", "--out", index, "-q")
    hits = [
        json.loads(line)
        for line in run("query", *[p for p, _ in val[:8]], "--index", index, "-k", "1", "--json").splitlines()
    ]
    assert len(hits) == 8 and all(h["rank"] == 1 for h in hits)
    correct = sum(h["text"] == caption for h, (_, caption) in zip(hits, val[:8]))
    assert correct >= 7, hits
