"""Audit reports on colour images and with randomized smoothing: the example PNGs decoded back (by
Pillow, an independent decoder) hold the model's inputs pixel for pixel, in colour, from NCHW or NHWC
samples and any domain; smoothing results appear in JSON, HTML, Markdown and the CLI as
probabilistic, with their alpha, equal to a separate smoothing run and kept out of the verdicts."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy
import pytest
from click.testing import CliRunner

from robeval.adapters.base import NetworkModel
from robeval.api import certify
from robeval.auditor import Profile, audit
from robeval.cli import main
from robeval.errors import InvalidParameterError
from robeval.report.images import as_image, encode_png, example_images, to_pixels
from robeval.report.report import Example, Report, schema

from nets import random_cnn

Image = pytest.importorskip("PIL.Image", reason="decoding the PNGs needs Pillow (pip install 'robeval[data]')")

TINY = Profile("tiny-colour", limit=24, eps={"linf": (0.02, 0.05), "l2": (0.25,)},
               attacks=(("fgsm", None), ("pgd", 5)), restarts=1, noise_kinds=("uniform",), noise_levels=(0.0, 0.1),
               draws=1, certifiers=("ibp",), masking_checks=(), examples=3)


def decode(data: bytes) -> numpy.ndarray:
    img = Image.open(io.BytesIO(data))
    img.load()
    return numpy.asarray(img)


def html_images(page: str) -> dict[str, bytes]:
    """{alt text: PNG bytes} of every inline image of the page."""
    return {alt: base64.b64decode(src) for alt, src in
            re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([^"]*)"', page)}


def report_with(examples, domain=(0.0, 1.0), **extra) -> Report:
    return Report(model={"label": "m", "input_shape": list(examples[0].x.shape), "num_classes": 10},
                  data={"name": "colour", "n": 10, "domain": list(domain)}, profile="tiny",
                  settings={"norm": "linf", "eps": [0.03], "seed": 0}, clean_accuracy=0.9,
                  examples=tuple(examples), **extra)


def colour_example(rng, shape=(3, 5, 7), index=4, eps=0.03):
    x = rng.uniform(0.1, 0.9, shape)
    x_adv = numpy.clip(x + rng.choice([-eps, 0.0, eps], size=shape), 0, 1)
    return Example(index=index, label=1, clean_prediction=1, adv_prediction=7, attack="pgd", eps=eps, x=x, x_adv=x_adv)


def blocks(pixels: numpy.ndarray, k: int) -> numpy.ndarray:
    """Undo the k x k enlargement, checking every block is one colour."""
    small = pixels[::k, ::k]
    numpy.testing.assert_array_equal(pixels, small.repeat(k, 0).repeat(k, 1))
    return small


def test_colour_chw_example_decodes_to_its_rgb_pixels():
    ex = colour_example(numpy.random.default_rng(0))
    page = report_with([ex]).to_html()
    found = html_images(page)
    original, adversarial = decode(found["original (sample 4)"]), decode(found["adversarial (sample 4)"])
    k = 14  # the longer side, 7, enlarged to at least 96 pixels
    assert original.shape == adversarial.shape == (5 * k, 7 * k, 3)
    want = numpy.rint(255 * ex.x.transpose(1, 2, 0)).astype(numpy.uint8)
    numpy.testing.assert_array_equal(blocks(original, k), want)
    numpy.testing.assert_array_equal(blocks(adversarial, k), numpy.rint(255 * ex.x_adv.transpose(1, 2, 0)))
    assert (want[..., 0] != want[..., 1]).any()  # truly colour, not three equal grey planes
    assert "colour" in page


def test_hwc_sample_gives_the_same_image_as_chw():
    ex = colour_example(numpy.random.default_rng(1), shape=(3, 6, 6))
    hwc = Example(**{**ex.to_dict(), "x": ex.x.transpose(1, 2, 0), "x_adv": ex.x_adv.transpose(1, 2, 0)})
    a, b = example_images(ex, (0, 1)), example_images(hwc, (0, 1))
    assert a["colour"] and b["colour"]
    for kind in ("original", "adversarial", "perturbation"):
        assert a[kind] == b[kind]


def test_grey_and_flat_samples():
    rng = numpy.random.default_rng(2)
    x = rng.uniform(0, 1, (1, 8, 8))
    grey = decode(encode_png(to_pixels(x, (0.0, 1.0))))
    assert grey.shape == (8, 8) and Image.open(io.BytesIO(encode_png(to_pixels(x, (0, 1))))).mode == "L"
    numpy.testing.assert_array_equal(grey, numpy.rint(255 * x[0]))
    flat_colour = rng.uniform(0, 1, 3 * 4 * 4)  # robeval's flatten order: channel, row, column
    numpy.testing.assert_array_equal(as_image(flat_colour), flat_colour.reshape(3, 4, 4).transpose(1, 2, 0))
    numpy.testing.assert_array_equal(as_image(x.reshape(-1)), x[0])


def test_domain_scaling_and_unbounded_inputs():
    rng = numpy.random.default_rng(3)
    ex = colour_example(rng, shape=(3, 4, 4))
    shifted = Example(**{**ex.to_dict(), "x": 2 * ex.x - 1, "x_adv": 2 * ex.x_adv - 1})  # domain [-1, 1]
    a = decode(example_images(ex, (0, 1))["original"])
    b = decode(example_images(shifted, (-1, 1))["original"])
    numpy.testing.assert_array_equal(a, b)
    im = example_images(shifted, (float("-inf"), float("inf")))  # unbounded: the pair's joint range
    lo = min(shifted.x.min(), shifted.x_adv.min())
    hi = max(shifted.x.max(), shifted.x_adv.max())
    want = numpy.rint(255 * (shifted.x - lo) / (hi - lo)).transpose(1, 2, 0)
    numpy.testing.assert_array_equal(blocks(decode(im["original"]), im["block"]), want)
    assert im["range"] == (lo, hi)


def test_perturbation_is_mid_grey_where_unchanged_and_full_scale_at_the_peak():
    ex = colour_example(numpy.random.default_rng(4), shape=(3, 6, 6), eps=0.05)
    im = example_images(ex, (0, 1))
    delta = blocks(decode(im["perturbation"]), im["block"]).astype(int)
    d = (ex.x_adv - ex.x).transpose(1, 2, 0)
    peak = numpy.abs(d).max()
    numpy.testing.assert_array_equal(delta, numpy.rint(255 * (0.5 + 0.5 * d / peak)))
    assert set(numpy.unique(delta[d == 0])) == {128}
    assert im["magnification"] == pytest.approx(0.5 / peak)
    assert im["linf"] == pytest.approx(peak) and im["l2"] == pytest.approx(numpy.sqrt((d ** 2).sum()))


def test_markdown_links_the_pngs_that_save_writes(tmp_path):
    rng = numpy.random.default_rng(5)
    report = report_with([colour_example(rng, index=4), colour_example(rng, index=9)])
    paths = report.save(tmp_path)
    text = paths["markdown"].read_text()
    links = re.findall(r"!\[(\w+)\]\(([^)]+)\)", text)
    assert len(links) == 6
    page_images = html_images(paths["html"].read_text())
    for kind, rel in links:
        data = (tmp_path / rel).read_bytes()
        index = int(re.search(r"sample(\d+)", rel).group(1))
        assert data == page_images[f"{kind} (sample {index})"]
        assert decode(data).ndim == 3
    (tmp_path / "examples" / "7-sample1-original.png").write_bytes(b"stale")
    report.save(tmp_path)
    assert not (tmp_path / "examples" / "7-sample1-original.png").exists()


@pytest.fixture(scope="module")
def colour_setup():
    rng = numpy.random.default_rng(6)
    net = random_cnn(rng, (3, 4, 4), hw=8, classes=4)
    x = rng.uniform(0, 1, (24, 3, 8, 8)).astype(numpy.float32)
    y = net.forward(x).argmax(1)
    return NetworkModel(net), x, y


@pytest.fixture(scope="module")
def smoothed_report(colour_setup):
    model, x, y = colour_setup
    return audit(model, (x, y), profile=TINY, norm="linf", sigma=[0.12, 0.25], smoothing_n=300, smoothing_n0=50,
                 smoothing_alpha=0.01, smoothing_radii=[0.0, 0.1, 0.2])


def test_colour_audit_examples_are_the_attack_outputs_in_colour(smoothed_report):
    report = smoothed_report
    assert report.examples and report.examples[0].x.shape == (3, 8, 8)
    found = html_images(report.to_html())
    for ex in report.examples:
        png = decode(found[f"adversarial (sample {ex.index})"])
        k = png.shape[0] // 8
        numpy.testing.assert_array_equal(blocks(png, k), numpy.rint(255 * ex.x_adv.transpose(1, 2, 0)))
        assert ex.adv_prediction != ex.label


def test_smoothing_in_the_audit_equals_a_separate_run(smoothed_report, colour_setup):
    model, x, y = colour_setup
    assert [s.sigma for s in smoothed_report.smoothing] == [0.12, 0.25]
    for sm in smoothed_report.smoothing:
        alone = certify(model, (x, y), method="smoothing", eps=[0.0, 0.1, 0.2], norm="l2", sigma=sm.sigma, n=300,
                        n0=50, alpha=0.01, seed=0)
        numpy.testing.assert_array_equal(sm.verdicts, alone.verdicts)
        numpy.testing.assert_array_equal(sm.radius, alone.radius)
        assert sm.certified_accuracy == alone.certified_accuracy
        for r, a in zip(sm.eps, sm.certified_accuracy):
            assert smoothed_report.metric("smoothed_certified_accuracy", sigma=sm.sigma, radius=r, alpha=0.01) == a
    assert smoothed_report.smoothing[0].certified_accuracy[0] > 0.5  # not a vacuous comparison


def test_smoothing_stays_out_of_verdicts_and_consistency(smoothed_report, colour_setup):
    model, x, y = colour_setup
    plain = audit(model, (x, y), profile=TINY, norm="linf")
    assert smoothed_report.verdicts() == plain.verdicts()
    assert smoothed_report.pairs_checked == plain.pairs_checked
    assert smoothed_report.eps_table() == plain.eps_table()
    assert "smoothing" not in plain.to_dict() and "smoothing" not in plain.settings


def test_smoothing_in_json_html_and_markdown(smoothed_report):
    jsonschema = pytest.importorskip("jsonschema", reason="schema validation needs jsonschema")
    payload = json.loads(smoothed_report.to_json())
    jsonschema.validate(payload, schema())
    assert payload["schema_version"] == "1.1"
    assert [s["kind"] for s in payload["smoothing"]] == ["probabilistic", "probabilistic"]
    assert payload["smoothing"][1]["alpha"] == 0.01 and payload["smoothing"][1]["confidence"] == pytest.approx(0.99)
    assert payload["settings"]["smoothing"] == {"sigma": [0.12, 0.25], "n0": 50, "n": 300, "alpha": 0.01,
                                                "radii": [0.0, 0.1, 0.2]}
    keys = {m["key"] for m in payload["metrics"]}
    assert "smoothed_certified_accuracy(alpha=0.01, radius=0.1, sigma=0.25)" in keys
    sm = smoothed_report.smoothing[1]
    c = sm.counts(1)
    row = ["0.25", "0.1", f"{100 * sm.certified_accuracy[1]:.1f}%", "0.01", str(c["abstain"]), str(c["incorrect"]),
           str(c["not_certified"]), "50", "300"]
    page, text = smoothed_report.to_html(), smoothed_report.to_markdown()
    assert "Randomized smoothing (probabilistic)" in page and "probability at least 1 - alpha" in page
    assert "<tr>" + "".join(f"<td>{v}</td>" for v in row) + "</tr>" in page
    assert "| " + " | ".join(row) + " |" in text
    assert "**Randomized smoothing (probabilistic)**" in text and "probabilistic, alpha=0.01" in text
    assert f"{sm.max_radius:.4g}" in text and f"{sm.max_radius:.4g}" in page
    with pytest.raises(jsonschema.ValidationError):
        bad = {**payload, "smoothing": [{**payload["smoothing"][0], "kind": "deterministic"}]}
        jsonschema.validate(bad, schema())


def test_smoothing_options_are_checked():
    with pytest.raises(InvalidParameterError, match="without sigma"):
        audit("robeval/models/digits_mlp.onnx", "digits", profile=TINY, smoothing_n=100)
    with pytest.raises(InvalidParameterError, match="sigma"):
        audit("robeval/models/digits_mlp.onnx", "digits", profile=TINY, sigma=-0.1)
    with pytest.raises(InvalidParameterError, match="radii"):
        audit("robeval/models/digits_mlp.onnx", "digits", profile=TINY, sigma=0.25, smoothing_radii=[-1.0])


def test_cli_audit_with_sigma(tmp_path):
    out = tmp_path / "rep"
    result = CliRunner().invoke(main, ["audit", "--data", "digits", "--limit", "20", "--eps", "0.1", "--sigma",
                                       "0.25", "--draws", "200", "--n0", "20", "--alpha", "0.01", "--radii", "0,0.1",
                                       "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "randomized smoothing (probabilistic" in result.output and "largest radius n=200" in result.output
    payload = json.loads((out / "report.json").read_text())
    assert [r["radius"] for r in payload["smoothing"][0]["results"]] == [0.0, 0.1]
    assert (out / "examples").is_dir() or not payload["examples"]
