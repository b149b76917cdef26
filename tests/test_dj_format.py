from beamcap.dj_format import SpecialTokens, plan_text, render_text, strip_special_tokens

IMG, EOC, AUD = "<__dj__image>", "<|__dj__eoc|>", "<__dj__audio>"


def render(text, captions):
    plan = plan_text(text)
    return render_text(plan, dict(enumerate(captions)))


def test_single_image_spec_example():
    assert render(f"{IMG}a photo of a cat", ["CAPTION"]) == f"{IMG} CAPTION {EOC}"


def test_each_caption_after_its_own_image_in_order():
    # Better than the reference, which put both after the first token in reverse order.
    assert render(f"{IMG}{IMG} two cats{EOC}", ["capA", "capB"]) == f"{IMG} capA {IMG} capB {EOC}"


def test_images_numbered_across_chunks_and_empty_chunks_skipped():
    text = f"{IMG} first {EOC}  \n {EOC}just text{EOC}{IMG} second {IMG}{EOC}   "
    plan = plan_text(text)
    assert [c.image_indices for c in plan.chunks] == [(0,), (), (1, 2)]
    assert render(text, ["A", "B", "C"]) == f"{IMG} A {EOC}{EOC}{IMG} B {IMG} C {EOC}"


def test_other_special_tokens_kept_in_order_and_plain_text_dropped():
    text = f"{AUD} hello {IMG} world <__dj__video>"
    assert render(text, ["X"]) == f"{AUD}{IMG} X <__dj__video>{EOC}"


def test_plain_text_of_chunk():
    plan = plan_text(f"  {IMG}  A photo, a women  {AUD} with an umbrella {EOC}")
    assert plan.chunks[0].plain_text == "A photo, a women   with an umbrella"
    assert strip_special_tokens(f"{IMG}a cat{EOC}", SpecialTokens()) == "a cat"


def test_no_image_tokens():
    plan = plan_text("just text")
    assert plan.num_image_tokens == 0
    assert len(plan.chunks) == 1


def test_custom_tokens():
    special = SpecialTokens(image="<img>", eoc="<eoc>")
    plan = plan_text("<img>a cat<eoc><img>a dog", special)
    assert plan.image_indices == (0, 1)
    assert render_text(plan, {0: "c0", 1: "c1"}, special) == "<img> c0 <eoc><img> c1 <eoc>"
