"""Audio models against their publishers' own code (issue 33): Auditory SlowFast's state dict
is the authors' (their checkpoint format loads key for key), its front end is their librosa
recipe (computed here by transformers' own numpy spectrogram and mel filter bank, which
follow librosa's formulas; librosa itself is not a dependency), and for `hf:` sound models
the front end is the library's own feature extractor, called on each window alone."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from ekx import EkxError
from ekx.extract import backbones
from ekx.extract.audio.frontend import LogMel, mel_filters

# The state dict of the authors' SlowFastAudio (epic-kitchens/epic-sounds-annotations,
# src/slowfast/models/auditory_slowfast.py, built with TIM's EPIC-Sounds config: R50, alpha 4,
# beta_inv 8, fusion 2/7, NUM_FRAMES 200), every "key shape" line sorted, less their classifier
# (head.projection.weight (44, 2304), head.projection.bias (44,)): 660 keys. Measured by running
# their module code (fvcore's c2_msra_fill and their registry stubbed) beside ekx's port, whose
# features then equalled theirs exactly (max difference 0.0 on random weights and statistics).
THEIR_KEYS = 660
THEIR_KEYS_SHA256 = "453032e8370c2e7ff22c9c309189ab2b8ff6dbdad50581f203a8240e337a10c1"
ASF = "audio:auditory_slowfast"


def _lines(sd: dict) -> list[str]:
    return sorted(f"{k} {tuple(v.shape)}" for k, v in sd.items())


@pytest.fixture(scope="module")
def asf():
    """The port with random weights and BatchNorm statistics (so every buffer matters)."""
    bb = backbones.get(ASF)
    model, _ = backbones.load_weights(bb, "none", seed=3)
    g = torch.Generator().manual_seed(4)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return bb, model.eval()


def test_auditory_slowfast_state_dict_is_the_authors(asf):
    bb, model = asf
    lines = _lines(model.state_dict())
    assert len(lines) == THEIR_KEYS
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == THEIR_KEYS_SHA256
    keys = set(model.state_dict())
    for k in ("s1.pathway0_stem.conv.weight", "s1_fuse.conv_f2s.weight", "s2.pathway0_res0.branch1_bn.running_mean",
              "s5.pathway1_res2.branch2.c_bn.weight", "s4_fuse.bn.num_batches_tracked"):  # fmt: skip
        assert k in keys
    assert bb.dim == 2304 and bb.classifier == ("head",)


def test_their_checkpoint_loads_and_gives_the_same_features(asf, tmp_path):
    """A checkpoint as their utils/checkpoint.py saves it ({"epoch", "model_state" with the
    classifier, "optimizer_state", "cfg"}), read back through --weights FILE."""
    bb, model = asf
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.projection.weight"], state["head.projection.bias"] = torch.randn(44, 2304), torch.zeros(44)
    path = tmp_path / "asf_epicsounds.pyth"
    torch.save({"epoch": 30, "model_state": state, "optimizer_state": {"state": {}}, "cfg": "MODEL:\n  ARCH: slowfast"},
               path)  # fmt: skip
    loaded, ident = backbones.load_weights(bb, str(path))
    assert ident.startswith("sha256:")
    x = bb.audio.frontend(torch.randn(1, bb.audio.samples) * 0.1, torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x), rtol=0, atol=0)
    # their naming is required: a state dict of another network is refused, naming the file
    state["s1.pathway0_stem.conv.weight"] = torch.zeros(3, 3)
    torch.save({"model_state": state}, path)
    with pytest.raises(EkxError, match=r"asf_epicsounds.pyth: not a audio:auditory_slowfast state dict"):
        backbones.load_weights(bb, str(path))


def test_log_mel_equals_their_librosa_recipe():
    """Their `_log_specgram`: librosa.stft(n_fft=2048, window="hann", hop 5 ms, win 10 ms,
    pad_mode="constant", centred), librosa.filters.mel(htk=True, norm=None), log(x + 1e-6).
    transformers' spectrogram frames a centred signal by frame_length // 2 where librosa pads
    n_fft // 2 and centres the window in n_fft: the same samples under the same window, so the
    same magnitudes."""
    from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

    fe = LogMel()
    rng = np.random.default_rng(0)
    t = np.arange(23975) / fe.rate
    wave = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32)
    wave[:4000] = 0  # silence too: the 1e-6 offset decides those values
    mel = mel_filter_bank(1 + fe.n_fft // 2, fe.mels, 0.0, fe.rate / 2, fe.rate, norm=None, mel_scale="htk")
    np.testing.assert_allclose(mel_filters(fe.rate, fe.n_fft, fe.mels), mel.T, atol=1e-6)
    ref = spectrogram(
        wave, window_function(fe.win_length, "hann"), frame_length=fe.win_length, hop_length=fe.hop,
        fft_length=fe.n_fft, power=1.0, center=True, pad_mode="constant", mel_filters=mel, mel_floor=0.0,
    )  # fmt: skip
    ref = np.log(ref + fe.eps).T  # [T, mels], their layout
    assert ref.shape == (200, 128)  # their NUM_FRAMES
    got = fe(torch.from_numpy(wave)[None]).numpy()
    assert got.shape == (1, 1, 200, 128)
    np.testing.assert_allclose(got[0, 0], ref, atol=2e-3, rtol=1e-4)


# ---------------------------------------------------------------- hf: sound models


def save_tiny_audio(kind: str, out, seed: int = 0):
    """A tiny random Hugging Face sound model and its feature extractor (save_pretrained)."""
    import transformers as T

    torch.manual_seed(seed)
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    if kind == "ast":
        model = T.ASTModel(T.ASTConfig(**small, num_mel_bins=16, max_length=32))
        fe = T.ASTFeatureExtractor(num_mel_bins=16, max_length=32)
    elif kind == "wav2vec2":
        conv = dict(conv_dim=(8, 8), conv_stride=(10, 10), conv_kernel=(10, 10), num_conv_pos_embeddings=16)
        model = T.Wav2Vec2Model(T.Wav2Vec2Config(**small, **conv, num_conv_pos_embedding_groups=2))
        fe = T.Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True)
    else:  # clap: its audio tower (HTSAT) read, its text tower left aside
        audio = dict(window_size=4, spec_size=64, num_mel_bins=16, depths=[1, 1], num_attention_heads=[1, 2],
                     patch_embeds_hidden_size=16, hidden_size=32, patch_size=4, patch_stride=(4, 4),
                     projection_dim=24)  # fmt: skip
        text = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
                    projection_dim=24, max_position_embeddings=32)  # fmt: skip
        model = T.ClapModel(T.ClapConfig(text_config=text, audio_config=audio, projection_dim=24))
        fe = T.ClapFeatureExtractor(feature_size=16, sampling_rate=16000, hop_length=160, max_length_s=1,
                                    fft_window_size=1024, truncation="rand_trunc")  # fmt: skip
    model.save_pretrained(out)
    fe.save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", ["ast", "wav2vec2", "clap"])
def test_hf_sound_model_front_end_and_features_are_the_librarys(kind, tmp_path):
    """ekx's batched front end equals the library's feature extractor called on each window
    alone; the features equal the library's model on that extractor's output."""
    import transformers as T

    d = save_tiny_audio(kind, tmp_path / kind)
    bb = backbones.get(f"hf:{d}")
    fe = T.AutoFeatureExtractor.from_pretrained(d)
    assert bb.audio is not None and bb.audio.rate == fe.sampling_rate == 16000
    want = {"ast": (32 - 1) * 160 + 400, "wav2vec2": 16000, "clap": 16000}[kind]
    assert bb.audio.samples == want
    rng = np.random.default_rng(1)
    windows = (0.1 * rng.standard_normal((3, want))).astype(np.float32)
    batch = bb.audio.frontend(torch.from_numpy(windows), torch.device("cpu"))
    for i, w in enumerate(windows):
        alone = fe(w, sampling_rate=16000, return_tensors="pt")
        assert set(alone) == set(batch)
        for key, value in alone.items():
            torch.testing.assert_close(batch[key][i : i + 1], value, rtol=0, atol=0)
    model, ident = backbones.load_weights(bb, "DEFAULT")
    assert ident.startswith(f"pretrained:hf {d} model.safetensors:")
    lib = {"ast": T.ASTModel, "wav2vec2": T.Wav2Vec2Model, "clap": T.ClapAudioModelWithProjection}[kind]
    ref_model = lib.from_pretrained(d).eval()
    with torch.no_grad():
        got = model(batch)
        out = ref_model(**batch)
        ref = {"ast": lambda: out.pooler_output, "clap": lambda: out.audio_embeds,
               "wav2vec2": lambda: out.last_hidden_state.mean(1)}[kind]()  # fmt: skip
    assert got.shape == (3, bb.dim)
    torch.testing.assert_close(got, ref)
