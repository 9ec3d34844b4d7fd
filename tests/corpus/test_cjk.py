"""Chinese text in corpora: duplicates across full- and half-width forms, spacing, COCO-CN files."""

import json

from retriever.corpus.cjk import dedupe_key, has_cjk, join_phrases, join_words, squash_spaces
from retriever.corpus.coco import clean_caption, convert_coco
from retriever.corpus.reader import read_corpus


def test_keys_fold_width_forms_and_spaces_between_ideographs():
    assert dedupe_key("红色五角星，ＡＢＣ１２３") == dedupe_key("红色 五角星,ABC123") == "红色五角星,ABC123"
    assert dedupe_key("a red  star") == "a red star" != dedupe_key("a redstar")  # English spaces are words
    assert dedupe_key("Red Star") != dedupe_key("red star") and dedupe_key("Red Star", fold_case=True) == "red star"
    assert squash_spaces(" 一个  男人 在 骑 自行车 on a bike ") == "一个男人在骑自行车 on a bike"
    assert has_cjk("かな") and has_cjk("，") and not has_cjk("naïve café")


def test_prompt_pieces_join_without_spaces_in_chinese():
    assert join_phrases(["a cat", "oil painting"]) == "a cat, oil painting"
    assert join_phrases(["一只猫", "油画", "by Monet"]) == "一只猫，油画，by Monet"
    assert join_words("水墨画", "齐白石") == "水墨画齐白石" and join_words("水墨画", "by Qi") == "水墨画 by Qi"


def test_corpus_drops_width_and_spacing_duplicates(tmp_path):
    path = tmp_path / "zh.txt"
    path.write_text(
        "红色的五角星，在左边\n红色的五角星,在左边\n红色的 五角星，在左边\nＣＬＩＰ模型\nCLIP模型\n蓝色圆形\n",
        encoding="utf-8",
    )
    corpus = read_corpus(path)
    assert corpus.texts == ["红色的五角星，在左边", "ＣＬＩＰ模型", "蓝色圆形"]  # the first form is kept as written
    assert corpus.report.duplicates == 3


def test_coco_cn_style_file_converts_with_chinese_captions(tmp_path):
    """COCO-CN's layout is COCO's, with Chinese (sometimes word-segmented) captions."""
    data = {
        "images": [
            {"id": 42, "file_name": "COCO_val2014_000000000042.jpg"},
            {"id": 73, "file_name": "COCO_val2014_000000000073.jpg"},
        ],
        "annotations": [
            {"image_id": 42, "id": 1, "caption": "一个 男人 在 骑 自行车 。"},
            {"image_id": 42, "id": 2, "caption": "一个男人在骑自行车。"},
            {"image_id": 73, "id": 3, "caption": "两只猫躺在沙发上，ＴＶ开着"},
            {"image_id": 73, "id": 4, "caption": "两只猫躺在沙发上,TV开着"},
        ],
    }
    src = tmp_path / "coco-cn_val.json"
    src.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "zh.txt"
    report = convert_coco(out, [src], captions_only=True)
    assert out.read_text(encoding="utf-8").splitlines() == ["一个男人在骑自行车。", "两只猫躺在沙发上，ＴＶ开着"]
    assert report.totals["duplicates"] == 2
    assert clean_caption("a  man\tcycling") == "a man cycling"
