"""Zero-shot CLIP / SigLIP (vislib.models.zeroshot), built offline from tiny configs: the prompts'
scores equal the image-text similarities computed by hand, text embeddings are computed once per
prompt, and any method explains a prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import vislib
from vislib.models import Preprocess
from vislib.models.zeroshot import ZeroShot

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ["<pad>", "<unk>", "</s>", "a", "an", "the", "photo", "of", "dog", "cat", "bird", "car", "red"]
PRE = Preprocess(resize=32, crop=32, mean=(0.5,) * 3, std=(0.5,) * 3)


def tiny_tokenizer():
    """A word-level tokenizer (no download) that ends every prompt with </s>, which CLIP pools."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                                eos_token="</s>")


def text_config():
    return dict(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=2,
                pad_token_id=0)


def vision_config():
    return dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                image_size=32, patch_size=8)


def tiny_clip():
    torch.manual_seed(0)
    config = transformers.CLIPConfig(text_config=text_config(), vision_config=vision_config(), projection_dim=12)
    return transformers.CLIPModel(config).eval()


def tiny_siglip():
    torch.manual_seed(0)
    config = transformers.SiglipConfig(text_config=text_config(), vision_config=vision_config())
    model = transformers.SiglipModel(config).eval()
    with torch.no_grad():
        model.logit_bias.fill_(-1.5)
    return model


def by_hand(model, tokenizer, prompts, x):
    """The model's own logits_per_image for the prompts (its forward with the text)."""
    tokens = tokenizer(list(prompts), padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                     pixel_values=x).logits_per_image


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    tiny_clip().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                                    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(5)
    return torch.randn(2, 3, 32, 32)


def test_a_clip_folder_loads_as_a_zero_shot_classifier_whose_scores_are_clips(clip_folder, x):
    prompts = ["a photo of a dog", "a photo of a cat", "a red car"]
    bundle = vislib.load_model(f"hf:{clip_folder}", labels=prompts, device="cpu")
    assert bundle.labels == prompts and bundle.prompts == prompts and bundle.scores == "logits"
    model, tokenizer = tiny_clip(), tiny_tokenizer()
    expected = by_hand(model, tokenizer, prompts, x)
    with torch.no_grad():
        got = bundle.logits(x)
        image = F.normalize(model.vision_model(pixel_values=x).pooler_output @ model.visual_projection.weight.T,
                            dim=-1)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
    tokens = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        text = model.text_model(**tokens).pooler_output @ model.text_projection.weight.T
    cosine = image @ F.normalize(text, dim=-1).T
    np.testing.assert_allclose(got.numpy(), (model.logit_scale.exp() * cosine).detach().numpy(),
                               rtol=1e-4, atol=1e-5)
    result = vislib.explain(bundle, x, ["gradcam", "gradient"], target="a photo of a cat")
    np.testing.assert_allclose(result.probs, F.softmax(expected, dim=1).numpy(), rtol=1e-4, atol=1e-6)
    assert result.target == [1, 1] and not result.flat["gradcam"].any()


def test_no_prompts_is_one_clear_error(clip_folder):
    with pytest.raises(vislib.ModelError, match="needs prompts"):
        vislib.load_model(f"hf:{clip_folder}", device="cpu")


def test_text_embeddings_are_computed_once_per_prompt(clip_folder, x):
    bundle = vislib.load_model(f"hf:{clip_folder}", labels=["a dog", "a cat"], device="cpu")
    cache = bundle.model.cache
    assert cache.computed == 2
    first = vislib.explain(bundle, x, ["gradcam"], target=vislib.Text("a bird"))
    assert first.labels == ["a dog", "a cat", "a bird"] and first.target == [2, 2]
    assert cache.computed == 3 and any("added" in n for n in first.notes)
    again = vislib.explain(bundle, x, ["gradcam"], target=vislib.Text("a bird"))
    assert cache.computed == 3  # cached: the second call costs one image forward + backward
    np.testing.assert_array_equal(first.maps["gradcam"], again.maps["gradcam"])
    other = bundle.with_prompts(["a cat", "a red car"])
    assert cache.computed == 4 and other.model.model is bundle.model.model
    expected = by_hand(tiny_clip(), tiny_tokenizer(), ["a cat", "a red car"], x)
    with torch.no_grad():
        np.testing.assert_allclose(other.logits(x).numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
    from helpers import GapNet, tiny_bundle

    with pytest.raises(vislib.TargetError, match="CLIP-like"):
        vislib.explain(tiny_bundle(GapNet()), torch.rand(1, 3, 16, 16), ["gradcam"], target=vislib.Text("a dog"))


def test_siglip_prompts_are_independent_sigmoids(x):
    model, tokenizer = tiny_siglip(), tiny_tokenizer()

    def tokenize(prompts):
        return tokenizer(prompts, padding=True, return_tensors="pt")

    prompts = ["a dog", "a photo of a cat"]
    bundle = vislib.load_model(ZeroShot(model, tokenize), labels=prompts, preprocess=PRE, device="cpu")
    assert bundle.scores == "sigmoid" and bundle.labels == prompts
    expected = by_hand(model, tokenizer, prompts, x)
    result = vislib.explain(bundle, x, ["gradcam", "gradient"], target="a dog", score="probability")
    np.testing.assert_allclose(result.probs, torch.sigmoid(expected).numpy(), rtol=1e-4, atol=1e-6)
    assert isinstance(result.what, vislib.Label) and result.describe_target() == "sigmoid of label 'a dog'"


def test_spec_file_prompts_and_scores(clip_folder, tmp_path, x):
    spec = tmp_path / "models.toml"
    spec.write_text(f'[models.zs]\nsource = "hf:{clip_folder}"\nprompts = ["a dog", "a cat"]\n\n'
                    f'[models.bad]\nsource = "resnet18"\nscores = "softmax"\n')
    with pytest.raises(vislib.ModelError, match="scores: one of"):
        vislib.register_models(spec)
    spec.write_text(f'[models.zs]\nsource = "hf:{clip_folder}"\nprompts = ["a dog", "a cat"]\n')
    vislib.register_models(spec)
    try:
        bundle = vislib.load_model("zs", device="cpu")
        assert bundle.labels == ["a dog", "a cat"] and bundle.prompts == ["a dog", "a cat"]
    finally:
        vislib.models.unregister_models(spec)
