"""shared.plots: training curves, confusion matrices, image grids and the augmentation preview."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared import plots
from shared.config import load_config

from conftest import tiny_tree

FULL_CSV = """epoch,loss,lr,top1,top5,val_loss,val_top1,val_top5
0,2.0,0.1,0.30,0.70,1.90,0.35,0.75
1,1.5,0.01,0.50,0.85,1.40,0.52,0.88
2,1.2,0.001,0.60,0.90,1.30,0.58,0.90
"""
TRAIN_ONLY_CSV = """epoch,loss,top1,top5
0,2.0,0.30,0.70
1,1.5,0.50,0.85
"""
AUX_HEADS_CSV = """epoch,aux1_loss,loss,lr,predictions_loss,predictions_top1,val_loss,val_predictions_top1
0,2.2,3.0,0.05,2.0,0.25,2.9,0.30
1,1.8,2.4,0.04,1.6,0.40,2.5,0.41
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.load()  # a truncated file fails here
        assert image.format == "PNG" and image.mode in ("RGB", "RGBA")
        return image.size


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def panels(figure) -> dict:
    """Panel title -> (axes, {line label: y data})."""
    return {axes.get_title(): (axes, {line.get_label(): line.get_ydata() for line in axes.get_lines()})
            for axes in figure.axes}


# --- curves --------------------------------------------------------------------------------------

def test_curves_with_validation_and_learning_rate(tmp_path):
    metrics = plots.read_metrics(write(tmp_path / "metrics.csv", FULL_CSV))
    np.testing.assert_array_equal(metrics["epoch"], [1, 2, 3])  # 1-based
    drawn = panels(plots.curves_figure(metrics))
    assert set(drawn) == {"loss", "top-1 accuracy", "learning rate"}
    np.testing.assert_allclose(drawn["loss"][1]["val"], [1.9, 1.4, 1.3])
    np.testing.assert_allclose(drawn["top-1 accuracy"][1]["train"], [0.3, 0.5, 0.6])
    assert drawn["learning rate"][0].get_yscale() == "log"  # 0.1 .. 0.001 spans 100x
    assert drawn["loss"][0].get_xaxis().get_data_interval()[0] == 1

    out = plots.plot_curves(tmp_path / "metrics.csv", tmp_path / "plots" / "curves.png")
    assert out == tmp_path / "plots" / "curves.png"
    width, height = png_size(out)
    assert width > height  # three panels side by side
    assert leftovers(tmp_path / "plots") == []


def test_curves_without_validation_or_lr_draw_fewer_panels(tmp_path):
    drawn = panels(plots.curves_figure(plots.read_metrics(write(tmp_path / "m.csv", TRAIN_ONLY_CSV))))
    assert set(drawn) == {"loss", "top-1 accuracy"}
    assert all(set(lines) == {"train"} for _, lines in drawn.values())
    narrow = png_size(plots.plot_curves(tmp_path / "m.csv", tmp_path / "two.png"))[0]
    wide = png_size(plots.plot_curves(write(tmp_path / "full.csv", FULL_CSV), tmp_path / "three.png"))[0]
    assert wide > narrow


def test_curves_of_a_model_with_auxiliary_heads_use_the_main_output(tmp_path):
    drawn = panels(plots.curves_figure(plots.read_metrics(write(tmp_path / "m.csv", AUX_HEADS_CSV))))
    np.testing.assert_allclose(drawn["top-1 accuracy"][1]["train"], [0.25, 0.40])
    np.testing.assert_allclose(drawn["top-1 accuracy"][1]["val"], [0.30, 0.41])
    np.testing.assert_allclose(drawn["loss"][1]["train"], [3.0, 2.4])  # the total loss
    assert drawn["learning rate"][0].get_yscale() == "linear"  # 0.05 .. 0.04


def test_curves_of_a_single_epoch(tmp_path):
    single = write(tmp_path / "m.csv", FULL_CSV.splitlines()[0] + "\n" + FULL_CSV.splitlines()[1] + "\n")
    drawn = panels(plots.curves_figure(plots.read_metrics(single)))
    np.testing.assert_allclose(drawn["loss"][1]["train"], [2.0])
    assert drawn["learning rate"][0].get_yscale() == "linear"
    png_size(plots.plot_curves(single, tmp_path / "curves.png"))


def test_curves_treat_na_cells_as_gaps(tmp_path):
    metrics = plots.read_metrics(write(tmp_path / "m.csv", "epoch,loss,val_loss\n0,2.0,NA\n1,1.5,1.4\n"))
    assert np.isnan(metrics["val_loss"][0]) and metrics["val_loss"][1] == 1.4


@pytest.mark.parametrize("content", [None, "", "epoch,loss,top1,lr\n"])
def test_curves_of_a_missing_or_empty_file_write_nothing(tmp_path, content):
    metrics = tmp_path / "metrics.csv"
    if content is not None:
        metrics.write_text(content)
    out = tmp_path / "plots" / "curves.png"
    assert plots.plot_curves(metrics, out) is None
    assert not out.exists()
    assert not (tmp_path / "plots").exists() or list((tmp_path / "plots").iterdir()) == []


# --- confusion -----------------------------------------------------------------------------------

def test_confusion_of_three_classes_is_annotated_and_labelled(tmp_path):
    confusion = [[8, 2, 0], [1, 9, 0], [0, 5, 5]]
    figure = plots.confusion_figure(confusion, ["cat", "dog", "fox"])
    axes = figure.axes[0]
    assert "73.33%" in axes.get_title()  # 22 of 30
    assert [label.get_text() for label in axes.get_yticklabels()] == ["cat", "dog", "fox"]
    cells = [text.get_text() for text in axes.texts]
    assert len(cells) == 9 and cells[:3] == ["0.80", "0.20", "0.00"]  # rows sum to 1
    np.testing.assert_allclose(axes.images[0].get_array().sum(axis=1), 1.0)
    raw = plots.confusion_figure(confusion, None, normalize=False).axes[0]
    assert [text.get_text() for text in raw.texts][:3] == ["8", "2", "0"]

    out = plots.plot_confusion(confusion, ["cat", "dog", "fox"], tmp_path / "new" / "confusion.png")
    png_size(out)
    assert leftovers(tmp_path / "new") == []


def test_confusion_of_sixty_classes_has_no_cell_text_or_tick_labels(tmp_path):
    rng = np.random.default_rng(0)
    confusion = np.diag(rng.integers(5, 10, 60)) + rng.integers(0, 2, (60, 60))
    confusion[7] = 0  # a class absent from the test split: its row stays zero, not NaN
    names = [f"class_{index}" for index in range(60)]
    axes = plots.confusion_figure(confusion, names).axes[0]
    assert len(axes.texts) == 0 and len(axes.get_xticks()) == 0
    assert np.isfinite(axes.images[0].get_array()).all()
    width, height = png_size(plots.plot_confusion(confusion, names, tmp_path / "confusion.png"))
    assert min(width, height) >= 1000  # grows with the number of classes
    with pytest.raises(ValueError, match="3 class names for a 60-class"):
        plots.confusion_figure(confusion, names[:3])


# --- layout by arithmetic -----------------------------------------------------------------------

def assert_laid_out(figure) -> None:
    """What constrained layout guaranteed, checked on the drawn figure: every text inside the figure, and no
    axes' texts (tick labels, axis labels, title) over another axes (a colorbar, the next panel)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    inside = figure.bbox.padded(1)  # antialiasing's pixel
    for axes in figure.axes:
        # The axes' texts as drawn: the ticks' labels in view and the axis label, the title and the offset.
        boxes = {"x axis": axes.xaxis.get_tightbbox(renderer), "y axis": axes.yaxis.get_tightbbox(renderer),
                 "title": axes.title.get_window_extent(renderer) if axes.get_title() else None}
        for name, box in boxes.items():
            if box is None:
                continue
            assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1, \
                f"the {name} of {axes.get_title() or axes} leaves the figure: {box} of {figure.bbox}"
            for other in figure.axes:
                if other is not axes and other not in axes._twinned_axes.get_siblings(axes):
                    assert not box.overlaps(other.get_window_extent(renderer)), f"the {name} over another axes"


@pytest.mark.parametrize("csv_text", [FULL_CSV, TRAIN_ONLY_CSV, AUX_HEADS_CSV,
                                      "epoch,loss,lr\n0,123456.0,1e-6\n1,1500.0,3e-6\n",  # wide labels, an offset
                                      "epoch,loss,top1\n0,2.0,0.30010\n1,1.5,0.30020\n"])
def test_curve_panels_leave_room_for_their_labels(tmp_path, csv_text):
    figure = plots.curves_figure(plots.read_metrics(write(tmp_path / "m.csv", csv_text)))
    assert_laid_out(figure)
    widths = {round(axes.get_position().width, 6) for axes in figure.axes}
    assert len(widths) == 1 and widths.pop() > 0.5 / len(figure.axes)  # equal panels, most of their slot


@pytest.mark.parametrize("size, names, normalize", [
    (3, ["cat", "dog", "fox"], True), (10, None, True), (4, ["a_folder_name_of_cats", "dogs", "fox", "emu"], True),
    (20, [f"a_very_long_class_name_{index}" for index in range(20)], False), (60, None, True)])
def test_the_confusion_map_leaves_room_for_names_title_and_colorbar(size, names, normalize):
    rng = np.random.default_rng(size)
    confusion = np.diag(rng.integers(600, 1000, size)) + rng.integers(0, 80, (size, size))
    figure = plots.confusion_figure(confusion, names, normalize)
    assert_laid_out(figure)
    heat_map, colorbar = figure.axes
    position = heat_map.get_position()
    assert position.width == pytest.approx(position.height)  # square, as imshow draws it
    assert position.width > 0.45 and colorbar.get_position().x0 > position.x1


def test_place_axes_leaves_room_for_a_twin_axis():
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.0, 3.2), dpi=plots.DPI)
    axes = figure.subplots()
    axes.plot([0, 1, 2], [0.6, 0.7, 0.75])
    axes.set_xlabel("round")
    axes.set_ylabel("held-out top1")
    twin = axes.twinx()
    twin.bar([0, 1, 2], [0, 2_000_000, 4_000_000])
    twin.set_ylabel("examples so far")
    plots.place_axes(figure, axes, twin)
    assert_laid_out(figure)
    assert axes.get_position().bounds == twin.get_position().bounds


# --- image grids ---------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 3])
def test_image_grid_grows_with_rows(tmp_path, channels):
    rng = np.random.default_rng(0)
    images = rng.normal(0, 2, (16, 12, 12, channels)).astype(np.float32)  # normalized: not in [0, 1]
    titles = [f"img {index}" for index in range(16)]
    two_rows = png_size(plots.image_grid(images[:8], titles[:8], tmp_path / "two.png", columns=4))
    four_rows = png_size(plots.image_grid(images, titles, tmp_path / "four.png", columns=4))
    assert four_rows[0] == two_rows[0] and four_rows[1] > 1.8 * two_rows[1]
    assert leftovers(tmp_path) == []


def test_image_grid_shows_each_image_in_unit_range_and_gray_for_one_channel(tmp_path):
    images = np.stack([np.full((4, 4, 1), -3.0), np.linspace(-5, 5, 16).reshape(4, 4, 1)])
    out = plots.image_grid(images, None, tmp_path / "grid.png", columns=8)
    layout = plots.grid_layout(2, 2, plots.GRID_CELL, title_inches=0.0)  # two columns: only two images
    first, second = (box_pixels(out, layout.image_box(index, 4, 4)) for index in range(2))
    assert np.all(first == 0)  # a flat image does not divide by zero: black
    assert (second[..., 0] == second[..., 1]).all() and (second[..., 1] == second[..., 2]).all()  # gray
    assert [second.min(), second.max()] == [0, 255]  # stretched to the full range
    assert second[0, 0, 0] == 0 and second[-1, -1, 0] == 255  # -5 top left, 5 bottom right
    with pytest.raises(ValueError, match="titles for"):
        plots.grid_figure(images, ["only one"])


def box_pixels(png: Path, box: tuple[int, int, int, int]) -> np.ndarray:
    """The RGB pixels of a PNG inside `box` (x, y, width, height from the top left corner)."""
    x, y, width, height = box
    with Image.open(png) as image:
        return np.asarray(image.convert("RGB"))[y:y + height, x:x + width]


def test_a_grid_puts_image_k_in_cell_k_enlarged_and_fitted_with_its_aspect(tmp_path):
    """Each image is one colour (its blue channel says which); a wide one fits the cell's width, centred."""
    count, columns = 7, 3
    images = np.zeros((count, 6, 6, 3), np.float32)
    images[..., 1] = 1.0  # green 1 and red 0: the stretch to [0, 1] leaves every colour as it is
    images[..., 2] = np.arange(count)[:, None, None] / count
    out = plots.image_grid(images, None, tmp_path / "grid.png", columns=columns)
    layout = plots.grid_layout(count, columns, plots.GRID_CELL, title_inches=0.0)
    with Image.open(out) as png:
        assert png.size == (layout.width, layout.height)
    for index in range(count):
        box = layout.image_box(index, 6, 6)
        assert box[2] == box[3] == layout.cell
        pixels = box_pixels(out, box).reshape(-1, 3)
        assert (pixels == pixels[0]).all()  # the whole box, nothing else drawn over it
        assert pixels[0].tolist() == [0, 255, int(255 * index / count)]

    wide = np.zeros((2, 4, 8, 1), np.float32)
    wide[:, :2] = 1.0  # top half white, bottom half black
    layout = plots.grid_layout(2, 2, 1.0, title_inches=0.0)
    canvas = plots.montage(wide, layout)
    x, y, width, height = layout.image_box(1, 4, 8)
    cell_x, cell_y = layout.cell_origin(1)
    assert (width, height) == (layout.cell, layout.cell // 2) and y - cell_y == layout.cell // 4 and x == cell_x
    assert (canvas[y:y + height // 2, x:x + width] == 255).all()
    assert (canvas[y + height // 2:y + height, x:x + width] == 0).all()
    assert (canvas[cell_y:y, x:x + width] == 255).all()  # above the image: the cell's white


def test_the_detection_gallery_draws_each_images_boxes_over_it_clipped_to_it(tmp_path):
    """Image 1 of 2 (black) has a true box (dashed white) and a prediction of class 1 (tab10 orange) running
    past its right and bottom edges: both lines sit where the image's pixels put them, none outside it."""
    from shared.detection import gallery

    images = np.zeros((2, 8, 8, 3), np.float32)
    truth = [(np.zeros((0, 4)), np.zeros(0, int)), (np.array([[0.0, 0.0, 4.0, 4.0]]), np.array([0]))]
    detections = [(np.zeros((0, 4)), np.zeros(0, int), np.zeros(0)),
                  (np.array([[3.5, 3.5, 20.0, 7.5]]), np.array([1]), np.array([0.9]))]
    out = gallery.plot_detections({"images": images, "detections": detections, "truth": truth}, ["a", "b"],
                                  tmp_path / "detections.png")
    layout = plots.grid_layout(2, 2, gallery.GALLERY_CELL, title_inches=0.25)
    assert (box_pixels(out, layout.image_box(0, 8, 8)) == 0).all()  # nothing over the first image
    x, y, width, height = layout.image_box(1, 8, 8)
    scale = width / 8  # box coordinates are continuous: pixel i of the image spans i to i + 1
    with Image.open(out) as png:
        pixels = np.asarray(png.convert("RGB")).astype(int)
    orange = np.argwhere((pixels == [255, 127, 14]).all(axis=-1))  # rows, columns
    assert len(orange) and orange.min(axis=0) == pytest.approx([y + 3.5 * scale, x + 3.5 * scale], abs=2)
    assert (orange.max(axis=0) < [y + height, x + width]).all()  # clipped to the image
    white = np.argwhere((pixels[y:y + height, x:x + width] == 255).all(axis=-1))
    assert white.min(axis=0) == pytest.approx([0, 0], abs=2)  # the box's edge is the image's
    assert white.max(axis=0) == pytest.approx([4 * scale] * 2, abs=2)


# --- augmentation preview ------------------------------------------------------------------------

@pytest.mark.slow
def test_preview_of_augmented_training_images(tmp_path):
    config = load_config(tree=tiny_tree(tmp_path / "runs", data={"augment": ["horizontal_flip"]}))
    out = plots.preview(config, tmp_path / "preview" / "augment.png", count=8, seed=3)
    width, height = png_size(out)
    assert width > height  # one row of eight
    assert leftovers(tmp_path / "preview") == []


def test_preview_with_mixup_spans_batches_and_titles_the_mixed_labels(tmp_path, monkeypatch):
    tree = tiny_tree(tmp_path / "runs", data={"batch_augment": [{"MixUp": {"alpha": 0.4}}]},
                     train={"batch_size": 8})
    titles_seen = []
    original = plots.image_grid

    def recording_grid(images, titles, out_png, columns=8):
        titles_seen.extend(titles)
        assert images.shape == (20, 16, 16, 3)
        return original(images, titles, out_png, columns)
    monkeypatch.setattr(plots, "image_grid", recording_grid)

    out = plots.preview(load_config(tree=tree), tmp_path / "mixup.png", count=20)
    png_size(out)
    assert len(titles_seen) == 20
    names, weights = zip(*(title.rsplit(" ", 1) for title in titles_seen))
    assert set(names) <= {"class_0", "class_1", "class_2", "class_3"}
    assert all(0.5 <= float(weight) <= 1.0 for weight in weights)  # the strongest of a two-way mix


# --- the most confident mistakes -----------------------------------------------------------------

def test_each_mistake_is_titled_with_its_image_cut_in_the_middle_to_fit():
    images = np.zeros((3, 4, 4, 3), np.float32)
    sources = ["cat-1.png", "ILSVRC2012_val_00012345.JPEG", "test #7"]
    figure = plots.errors_figure(images, ["cat"] * 3, ["dog"] * 3, [0.9, 0.8, 0.7], sources=sources)
    titles = [title.splitlines() for title in image_titles(figure)]
    assert [lines[2] for lines in titles] == ["cat-1.png", "ILSVRC…012345.JPEG", "test #7"]
    assert all(len(lines[2]) <= plots.TITLE_CHARS for lines in titles)
    unnamed = plots.errors_figure(images, ["cat"] * 3, ["dog"] * 3, [0.9, 0.8, 0.7])
    assert [title.splitlines() for title in image_titles(unnamed)] == [["cat", "dog 0.90"], ["cat", "dog 0.80"],
                                                                        ["cat", "dog 0.70"]]
    with pytest.raises(ValueError, match="2 sources"):
        plots.errors_figure(images, ["cat"] * 3, ["dog"] * 3, [0.9, 0.8, 0.7], sources=sources[:2])


def image_titles(figure) -> list[str]:
    """The texts of a grid figure but its heading: each image's title, in the images' order."""
    return [text.get_text() for text in figure.texts if text.get_text() != figure.get_suptitle()]


def test_grid_titles_sit_above_their_images_inside_the_figure_and_under_the_heading(tmp_path):
    """Grids are laid out by arithmetic (`plots.grid_layout`): the room it leaves must hold three title lines.
    The images are one colour that black text on white never makes, found in the PNG: no title may reach into
    them."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    images = np.zeros((6, 8, 8, 3), np.float32)
    colour = {"mean": [0.0, 128.0, 255.0], "std": [1.0] * 3}  # shown unnormalized
    sources = ["ILSVRC2012_val_00012345.JPEG"] * 6
    figures = [plots.errors_figure(images, ["T-shirt/top"] * 6, ["Ankle boot"] * 6, [0.93] * 6, columns=3,
                                   sources=sources, **colour),
               plots.errors_figure(images, ["T-shirt/top"] * 6, ["Ankle boot"] * 6, [0.93] * 6, columns=3, **colour),
               plots.grid_figure(images + [0.0, 0.5, 1.0], ["Ankle boot 0.93"] * 6, columns=3)]
    for figure in figures:
        out = plots.save_figure(figure, tmp_path / "grid.png")
        with Image.open(out) as png:
            pixels = np.asarray(png.convert("RGB"))
        cells = colour_boxes(pixels)
        assert len(cells) == 6 and len({(box[2], box[3]) for box in cells}) == 1  # whole, none drawn over
        renderer = FigureCanvasAgg(figure).get_renderer()
        height = pixels.shape[0]
        extents = [text.get_window_extent(renderer) for text in figure.texts]
        titles = [e for text, e in zip(figure.texts, extents) if text.get_text() != figure.get_suptitle()]
        headings = [e for text, e in zip(figure.texts, extents) if text.get_text() == figure.get_suptitle()]
        assert len(titles) == 6 and len(headings) == (1 if figure.get_suptitle() else 0)
        for box in titles + headings:
            assert figure.bbox.x0 <= box.x0 and box.x1 <= figure.bbox.x1
            assert figure.bbox.y0 <= box.y0 and box.y1 <= figure.bbox.y1
            for x, y, width, tall in cells:  # pixels from the top; the extents from the bottom
                assert box.x1 <= x or box.x0 >= x + width or height - box.y0 <= y or height - box.y1 >= y + tall
        for heading in headings:
            assert not any(heading.overlaps(title) for title in titles)


def colour_boxes(pixels: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(x, y, width, height) of each rectangle of the one colour (not gray) in a grid's pixels, row by row. A
    rectangle must be whole: any other pixel inside it (a title drawn over the image) fails."""
    coloured = pixels[(pixels[..., 0] != pixels[..., 1])]
    values, counts = np.unique(coloured, axis=0, return_counts=True)
    mask = (pixels == values[np.argmax(counts)]).all(axis=-1)

    def runs(flags: np.ndarray) -> list[tuple[int, int]]:
        edges = np.flatnonzero(np.diff(np.concatenate([[0], flags.astype(int), [0]])))
        return list(zip(edges[::2], edges[1::2]))

    boxes = []
    for top, bottom in runs(mask.any(axis=1)):
        for left, right in runs(mask[top:bottom].any(axis=0)):
            assert mask[top:bottom, left:right].all(), f"something drawn over the image at {left}, {top}"
            boxes.append((int(left), int(top), int(right - left), int(bottom - top)))
    return boxes


def test_the_confident_mistakes_know_their_places_in_the_pass():
    from shared.classification.evaluate import ConfidentMistakes

    mistakes = ConfidentMistakes(limit=3)
    images = np.zeros((4, 2, 2, 1), np.float32)
    mistakes.update(images, np.array([0, 1, 1, 0]), np.array([1, 1, 0, 0]), np.array([0.6, 0.9, 0.7, 0.9]))
    mistakes.update(images, np.array([0, 0, 0, 0]), np.array([0, 1, 0, 1]), np.array([0.9, 0.95, 0.9, 0.5]))
    assert mistakes.positions.tolist() == [5, 2, 0]  # by score: 0.95, 0.7, 0.6
    files = [f"/data/cls/img{i}.png" for i in range(8)]
    assert mistakes.sources(files) == ["img5.png", "img2.png", "img0.png"]
    assert mistakes.sources(None) == ["test #5", "test #2", "test #0"]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["folder", "fashion_mnist"])
def test_errors_png_names_each_images_file_or_its_index(tmp_path, monkeypatch, source, one_conv_model):
    """Training draws errors.png with each mistake's file (folder, ilsvrc) or, for arrays, its index in the
    test split; both are checked against the true class the tile shows."""
    from shared.lifecycle import train

    from test_data import fake_fashion_dir
    from test_own_folders import make_class_folders

    drawn = {}
    plot_errors = plots.plot_errors

    def recorded(images, true_names, predicted_names, scores, out_png, *args, **kwargs):
        drawn.update(true=true_names, sources=kwargs.get("sources"))
        return plot_errors(images, true_names, predicted_names, scores, out_png, *args, **kwargs)

    monkeypatch.setattr(plots, "plot_errors", recorded)
    if source == "folder":
        data = {"source": "folder", "path": str(make_class_folders(tmp_path / "photos", {"cat": 8, "dog": 8})),
                "image_size": 12, "channels": 3, "test_fraction": 0.5, "num_classes": None}
    else:
        data = {"source": "fashion_mnist", "path": str(fake_fashion_dir(tmp_path / "fm")), "num_classes": None,
                "channels": 1, "image_size": 16}
    tree = tiny_tree(tmp_path / "runs", data=data, train={"epochs": 1, "batch_size": 8})
    tree["model"] = one_conv_model  # what is checked is how mistakes are named, not the model
    train(load_config(tree=tree), argv=["pytest"])
    assert drawn["sources"]  # there were mistakes to show
    for true, shown in zip(drawn["true"], drawn["sources"]):
        if source == "folder":  # make_class_folders names each file <class>-<seed>-<i>.png
            assert shown.endswith(".png") and shown.split("-")[0] == true
        else:  # fake_fashion_dir labels test image i as class i % 10
            from shared.fashion_mnist import FASHION_MNIST_CLASSES

            assert FASHION_MNIST_CLASSES[int(shown.removeprefix("test #")) % 10] == true


def test_errors_png_names_the_files_read_when_some_were_skipped():
    """With data.on_corrupt: skip the test pass reads the split less the images it left out: the mistakes are
    named from that list (a count that does not add up falls back to places, `test #N`)."""
    from types import SimpleNamespace

    from shared.classification.task import _test_files

    datasets = SimpleNamespace(source=SimpleNamespace(files={"test": ["a.png", "b.png", "c.png", "d.png"]}),
                               num_test=4)
    assert _test_files(datasets, 4) == ["a.png", "b.png", "c.png", "d.png"]
    assert _test_files(datasets, 3, ["b.png"]) == ["a.png", "c.png", "d.png"]
    assert _test_files(datasets, 2, ["b.png"]) is None
