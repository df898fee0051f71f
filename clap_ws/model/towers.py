"""laion-clap's network, adapted for serving without changing its numbers.

* :func:`fft_stft` - the spectrogram as an FFT instead of two 1024x513
  convolutions (checked against the checkpoint's frozen kernels);
* :func:`cast_weights` / :func:`fp32_forward` - reduced precision with the
  spectrogram front end kept in fp32;
* :func:`pack_linears` / :func:`unpack_linears` - weights laid out once for
  oneDNN on a CPU;
* :mod:`clap_ws.model.swin` - the audio transformer's forwards for inference (no
  work whose result is thrown away, fewer passes over the activations);
* :class:`AudioTower` / :class:`TextTower` - each encoder and its projection
  as one module: the unit ``torch.compile`` sees, and what eager calls run;
  :class:`AudioBody` - the audio tower after its front end, for other engines;
* :func:`fusion_mel` - the fusion models' input, in plain torch;
* :func:`chunk_sizes` - how many windows go through the network per call.
"""

from __future__ import annotations

import numpy as np
import torch


def fp32_forward(module: torch.nn.Module) -> None:
    """Run ``module`` in fp32 even inside an autocast region."""
    forward = module.forward
    device_type = next(module.buffers(), torch.empty(0)).device.type

    def fp32(x, *args, **kwargs):
        with torch.autocast(device_type, enabled=False):
            return forward(x.float(), *args, **kwargs)

    module.forward = fp32


def fft_stft(stft: torch.nn.Module) -> bool:
    """Swap torchlibrosa's conv1d STFT for ``torch.stft`` when its kernels are a plain DFT.

    torchlibrosa computes the spectrogram as two 1024x513 convolutions (about
    2 GFLOP per 10-s window); an FFT gives the same numbers for a fraction of
    that. The kernels are frozen in every LAION-CLAP checkpoint, but they are
    checked here anyway: if they are not a windowed DFT, nothing is changed.
    """
    real, imag = stft.conv_real.weight[:, 0, :], stft.conv_imag.weight[:, 0, :]
    n_fft = real.shape[1]
    window = real[0].detach().clone()  # the k=0 row is the window itself
    angle = 2 * np.pi * torch.outer(torch.arange(real.shape[0], dtype=torch.float64),
                                    torch.arange(n_fft, dtype=torch.float64)) / n_fft
    expected = torch.cos(angle) * window.double(), torch.sin(angle) * window.double()
    if not (torch.allclose(real.double().cpu(), expected[0].cpu(), atol=1e-5)
            and torch.allclose(imag.double().abs().cpu(), expected[1].abs().cpu(), atol=1e-5)):
        return False
    hop, center, pad_mode = stft.hop_length, stft.center, stft.pad_mode

    def forward(x):
        spec = torch.stft(x.float(), n_fft, hop_length=hop, win_length=n_fft, window=window.to(x.device),
                          center=center, pad_mode=pad_mode, return_complex=True)
        spec = spec.transpose(1, 2)[:, None]  # (B, 1, T, F) like torchlibrosa
        return spec.real, spec.imag

    stft.forward = forward
    return True


def chunk_sizes(count: int, chunk: int) -> list[int]:
    """Split ``count`` windows into powers of two of at most ``chunk``, largest first."""
    sizes = []
    while count:
        size = min(chunk, 1 << (count.bit_length() - 1))
        size = 1 << (size.bit_length() - 1)
        sizes.append(size)
        count -= size
    return sizes


def cast_weights(net: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast ``net`` to ``dtype`` once, keeping the spectrogram front end in fp32.

    The front end's output is cast to ``dtype`` for the layers after it.
    Idempotent, because tests build several :class:`ClapModel` on one network.
    """
    branch = net.audio_branch
    if getattr(branch, "_clap_ws_dtype", None) == dtype:
        return
    net.to(dtype)
    names = [n for n in ("spectrogram_extractor", "logmel_extractor") if hasattr(branch, n)]
    for name in names:
        getattr(branch, name).float()
    if names:
        last = getattr(branch, names[-1])
        forward = last.forward
        last.forward = lambda x, *args, **kwargs: forward(x.float(), *args, **kwargs).to(dtype)
    branch._clap_ws_dtype = dtype


def pack_linears(module: torch.nn.Module) -> int:
    """Lay out every ``Linear`` weight in ``module`` once, in oneDNN's blocked format (CPU, bf16 or fp32).

    Unpacked, a bf16 weight is re-laid-out by oneDNN on every call, and an
    fp32 one goes to MKL's GEMM. Packing pays for text (a prompt is a few
    tokens, so each matmul reads its whole weight to do little work) and for
    audio with the Swin forwards of :mod:`clap_ws.model.swin` (figures:
    ``docs/experiments.md``).

    Costs a second copy of the packed weights; the originals stay for
    ``state_dict`` and ``torch.compile``. Returns how many were packed;
    packing twice packs nothing new.
    """
    count = 0
    for linear in module.modules():
        if type(linear) is not torch.nn.Linear or "forward" in vars(linear):
            continue
        with torch.no_grad():
            packed, bias = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach()), linear.bias

        def forward(x, packed=packed, bias=bias):
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

        linear.forward = forward
        count += 1
    return count


def unpack_linears(module: torch.nn.Module) -> None:
    """Undo :func:`pack_linears` (before a cast, or for ``torch.compile``, which packs by itself)."""
    for linear in module.modules():
        if type(linear) is torch.nn.Linear:
            vars(linear).pop("forward", None)


def can_pack_linears(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`pack_linears` applies: fp32 weights, or bf16 ones where oneDNN has native bf16, on a CPU."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class AudioTower(torch.nn.Module):
    """Waveforms to raw audio embeddings: laion-clap's audio branch and projection as one module.

    It is the unit that ``torch.compile`` sees; eager models call it too, so
    both paths run the same code. Non-fusion models run :func:`log_mel` and
    then :class:`AudioBody`, which is what HTSAT's own forward does for them
    in eval mode; fusion models run that forward, with their fusion input.
    """

    def __init__(self, net: torch.nn.Module, fusion: bool):
        super().__init__()
        self.branch, self.projection, self.fusion = net.audio_branch, net.audio_projection, fusion
        self.body = None if fusion else AudioBody(net)
        self.audio_cfg = net.audio_cfg

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if not self.fusion:
            return self.body(log_mel(self.branch, waveform))
        batch = {"waveform": waveform,
                 "longer": torch.zeros(waveform.shape[0], dtype=torch.bool, device=waveform.device),
                 "mel_fusion": fusion_mel(waveform, self.audio_cfg).to(self.projection[0].weight.dtype)}
        return self.projection(self.branch(batch, mixup_lambda=None, device=waveform.device)["embedding"])


class AudioBody(torch.nn.Module):
    """A non-fusion audio tower after its spectrogram front end: log-mel (B, 1, T, mel bins) -> raw embedding.

    HTSAT's forward in eval mode, after :func:`log_mel`: ``bn0`` over the mel
    bins, the time-frequency image, the transformer, then the projection.
    This is the part other engines can take
    (:mod:`clap_ws.model.openvino_audio`, ``benchmarks/engines.py``): the
    front end's FFT returns complex tensors, which neither ``torch.onnx`` nor
    OpenVINO converts, and it is a small part of a window.
    """

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.branch, self.projection = net.audio_branch, net.audio_projection

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        branch = self.branch
        x = branch.bn0(mel.transpose(1, 3)).transpose(1, 3)
        return self.projection(branch.forward_features(branch.reshape_wav2img(x))["embedding"])


def log_mel(branch: torch.nn.Module, waveform: torch.Tensor) -> torch.Tensor:
    """HTSAT's spectrogram front end: waveforms (B, samples) -> log-mel (B, 1, T, mel bins)."""
    return branch.logmel_extractor(branch.spectrogram_extractor(waveform))


class TextTower(torch.nn.Module):
    """Token ids to raw text embeddings: laion-clap's RoBERTa branch and projection as one module."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.branch, self.projection = net.text_branch, net.text_projection

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.projection(self.branch(input_ids=input_ids, attention_mask=attention_mask)["pooler_output"])


def fusion_mel(windows: torch.Tensor, audio_cfg) -> torch.Tensor:
    """laion-clap's fusion input for windows of <= 10 s: 4 copies of the log-mel.

    laion-clap computes it with torchaudio's MelSpectrogram (HTK mel scale, no
    filter normalisation, power 2, centred reflect padding) and
    ``AmplitudeToDB``; this is the same computation in plain torch, because
    torchaudio has no CPU build for every torch.
    """
    n_fft, hop = audio_cfg.window_size, audio_cfg.hop_size
    spec = torch.stft(
        windows.float(), n_fft, hop_length=hop, win_length=n_fft,
        window=torch.hann_window(n_fft, device=windows.device), center=True,
        pad_mode="reflect", return_complex=True,
    ).abs().pow(2)  # (B, F, T)
    freqs = torch.linspace(0, audio_cfg.sample_rate // 2, n_fft // 2 + 1, device=windows.device)

    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    mels = torch.linspace(hz_to_mel(audio_cfg.fmin), hz_to_mel(audio_cfg.fmax),
                          audio_cfg.mel_bins + 2, device=windows.device)
    edges = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    slopes = edges[None, :] - freqs[:, None]
    widths = edges[1:] - edges[:-1]
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    bank = torch.clamp(torch.minimum(down, up), min=0)  # (F, mel_bins)
    mel = torch.einsum("bft,fm->btm", spec, bank)
    log_mel = 10.0 * torch.log10(torch.clamp(mel, min=1e-10))
    return log_mel[:, None].expand(-1, 4, -1, -1)  # (B, 4, T, mel_bins)
