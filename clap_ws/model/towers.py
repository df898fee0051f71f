"""laion-clap's network, adapted for serving without changing its numbers or its modules.

* :func:`own_copy` - a model's own module tree over the network's weights,
  which is all that is adapted (laion-clap's modules keep their forwards);
* :class:`FrontEnd` / :class:`FftSpectrogram` - the spectrogram as an FFT
  instead of two 1024x513 convolutions, always in fp32;
* :func:`cast_weights` - reduced precision with the front end kept in fp32;
* :func:`pack_linears` / :class:`PackedLinear` - weights laid out once for
  oneDNN on a CPU;
* :mod:`clap_ws.model.swin` and :mod:`clap_ws.model.roberta` - the two
  encoders' forwards for inference (no work whose result is thrown away);
* :class:`AudioTower` / :class:`TextTower` - each encoder and its projection
  as one module: the unit ``torch.compile`` sees, and what eager calls run;
  :class:`AudioBody` - the audio tower after its front end, for other engines;
* :func:`fusion_mel` - the fusion models' input, in plain torch;
* :func:`int16_round_trip` - laion-clap's quantisation of the waveform;
* :func:`chunk_sizes` - how many windows go through the network per call.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from .roberta import Roberta
from .swin import Swin


def own_copy(net: torch.nn.Module) -> torch.nn.Module:
    """A new module tree over the same parameters and buffers.

    What one :class:`~clap_ws.model.ClapModel` adapts for serving (packed
    linears, its own forwards): models built over one network, variants and
    tests, then never see each other's changes, and laion-clap's own modules
    keep their own forwards. Costs the module objects, not the weights.
    """
    memo = {id(t): t for t in (*net.parameters(), *net.buffers())}
    return copy.deepcopy(net, memo)


class FftSpectrogram(torch.nn.Module):
    """torchlibrosa's ``Spectrogram`` (power of two 1024x513 convolutions) as one ``torch.stft``.

    The convolutions cost about 2 GFLOP per 10-s window; an FFT gives the
    same numbers for a fraction of that. Build it with :meth:`of`, which
    checks that the kernels are a windowed DFT (they are frozen in every
    LAION-CLAP checkpoint).
    """

    def __init__(self, window: torch.Tensor, hop: int, center: bool, pad_mode: str, power: float):
        super().__init__()
        self.register_buffer("window", window, persistent=False)
        self.n_fft, self.hop, self.center, self.pad_mode, self.power = len(window), hop, center, pad_mode, power

    @classmethod
    def of(cls, spectrogram: torch.nn.Module) -> torch.nn.Module:
        """The FFT form of ``spectrogram``, or ``spectrogram`` itself where its kernels are not a plain DFT."""
        stft = spectrogram.stft
        real, imag = stft.conv_real.weight[:, 0, :], stft.conv_imag.weight[:, 0, :]
        n_fft = real.shape[1]
        window = real[0].detach().clone().float()  # the k=0 row is the window itself
        angle = 2 * np.pi * torch.outer(torch.arange(real.shape[0], dtype=torch.float64),
                                        torch.arange(n_fft, dtype=torch.float64)) / n_fft
        expected = torch.cos(angle) * window.double().cpu(), torch.sin(angle) * window.double().cpu()
        if not (torch.allclose(real.double().cpu(), expected[0], atol=1e-5)
                and torch.allclose(imag.double().abs().cpu(), expected[1].abs(), atol=1e-5)):
            return spectrogram
        return cls(window, stft.hop_length, stft.center, stft.pad_mode, spectrogram.power)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(x.float(), self.n_fft, hop_length=self.hop, win_length=self.n_fft,
                          window=self.window, center=self.center, pad_mode=self.pad_mode, return_complex=True)
        power = (spec.real**2 + spec.imag**2).transpose(1, 2)[:, None]  # (B, 1, T, F) like torchlibrosa
        return power if self.power == 2.0 else power ** (self.power / 2.0)


class FrontEnd(torch.nn.Module):
    """HTSAT's spectrogram front end, always in fp32: waveforms (B, samples) -> log-mel (B, 1, T, mel bins).

    A power spectrum overflows fp16 and loses bf16's few bits, so the front end
    runs in fp32 whatever the precision (autocast off), and its output is cast
    to ``dtype`` for the layers after it (None: left fp32, as under autocast).
    """

    def __init__(self, branch: torch.nn.Module, dtype: torch.dtype | None = None):
        super().__init__()
        self.spectrogram = FftSpectrogram.of(branch.spectrogram_extractor)
        self.logmel = branch.logmel_extractor
        self.dtype = dtype

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        with torch.autocast(waveform.device.type, enabled=False):
            mel = self.logmel(self.spectrogram(waveform.float()))
        return mel if self.dtype is None else mel.to(self.dtype)


def int16_round_trip(windows: np.ndarray) -> np.ndarray:
    """laion-clap's int16 round trip: clip to [-1, 1], scale, truncate, scale back (LAION models' first step;
    transformers has none, :class:`~clap_ws.model.checkpoint.Preprocessing`)."""
    q = (np.clip(windows, -1.0, 1.0) * 32767.0).astype(np.int16)
    return (q / np.float32(32767.0)).astype(np.float32)


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
    """Cast ``net``'s floating-point weights to ``dtype``, except the spectrogram front end's (see
    :class:`FrontEnd`), which are never rounded: its DFT kernels must stay exact for :class:`FftSpectrogram`."""
    branch = net.audio_branch
    front = {id(m) for name in ("spectrogram_extractor", "logmel_extractor") if hasattr(branch, name)
             for m in getattr(branch, name).modules()}
    with torch.no_grad():
        for module in net.modules():
            if id(module) in front:
                continue
            for param in module.parameters(recurse=False):
                if param.is_floating_point():
                    param.data = param.data.to(dtype)
            for name, buffer in module.named_buffers(recurse=False):
                if buffer is not None and buffer.is_floating_point():
                    module._buffers[name] = buffer.to(dtype)


class PackedLinear(torch.nn.Module):
    """A ``Linear`` whose weight is laid out once in oneDNN's blocked format (CPU, bf16 or fp32).

    Unpacked, a bf16 weight is re-laid-out by oneDNN on every call, and an
    fp32 one goes to MKL's GEMM. Costs a second copy of the weight; the
    original stays in ``linear`` (and in ``state_dict``).
    """

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.linear = [linear]  # not a child: its weight is the original's, the packed copy is what runs
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(module: torch.nn.Module) -> int:
    """Replace every ``Linear`` inside ``module`` by a :class:`PackedLinear`; how many were replaced.

    Pays for text (a prompt is a few tokens, so each matmul reads its whole
    weight to do little work) and for audio with the Swin modules of
    :mod:`clap_ws.model.swin` (figures: ``docs/experiments.md``). Only for a
    model's own modules (:func:`own_copy`): laion-clap's stay as they are.
    """
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(parent, name, PackedLinear(child))
                count += 1
    return count


def can_pack_linears(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`pack_linears` applies: fp32 weights, or bf16 ones where oneDNN has native bf16, on a CPU."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class AudioBody(torch.nn.Module):
    """An audio tower after its spectrogram front end: log-mel (B, C, T, mel bins) -> raw embedding.

    HTSAT's forward in eval mode after the front end: ``bn0`` over the mel
    bins, the time-frequency image, the transformer (:class:`~clap_ws.model.swin.Swin`),
    then the projection; ``longer_idx=[]`` for fusion models' 4-channel input.
    This is the part other engines can take
    (:mod:`clap_ws.model.openvino_audio`, ``benchmarks/engines.py``): the
    front end's FFT returns complex tensors, which neither ``torch.onnx`` nor
    OpenVINO converts, and it is a small part of a window.
    """

    def __init__(self, branch: torch.nn.Module, projection: torch.nn.Module):
        super().__init__()
        self.bn0, self.swin, self.projection = branch.bn0, Swin(branch), projection
        self.to_image = branch.reshape_wav2img  # a reshape with the branch's frequency ratio

    @classmethod
    def of(cls, net: torch.nn.Module) -> AudioBody:
        """The body of ``net``'s audio tower, on modules of its own (:func:`own_copy`), unpacked."""
        own = own_copy(net)
        return cls(own.audio_branch, own.audio_projection)

    def forward(self, mel: torch.Tensor, longer_idx=None) -> torch.Tensor:
        x = self.bn0(mel.transpose(1, 3)).transpose(1, 3)
        return self.projection(self.swin(self.to_image(x), longer_idx=longer_idx))


class AudioTower(torch.nn.Module):
    """Waveforms to raw audio embeddings: the front end and the body as one module.

    It is the unit that ``torch.compile`` sees; eager models call it too, so
    both paths run the same code. Fusion models take their 4-channel fusion
    input (:func:`fusion_mel`) instead of the front end's log-mel: what HTSAT's
    own forward does in eval mode when no clip of the batch is longer than 10 s.
    With ``fusion_from_front_end`` that input is 4 copies of the front end's
    log-mel instead, as transformers' feature extractor makes it (its filters
    are then the front end's).
    """

    def __init__(self, front_end: FrontEnd, body: AudioBody, fusion: bool, audio_cfg,
                 fusion_from_front_end: bool = False):
        super().__init__()
        self.front_end, self.body, self.fusion, self.audio_cfg = front_end, body, fusion, audio_cfg
        self.fusion_from_front_end = fusion_from_front_end

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if not self.fusion:
            return self.body(self.front_end(waveform))
        if self.fusion_from_front_end:
            return self.body(self.front_end(waveform).expand(-1, 4, -1, -1), longer_idx=[])
        mel = fusion_mel(waveform, self.audio_cfg)
        return self.body(mel if self.front_end.dtype is None else mel.to(self.front_end.dtype), longer_idx=[])


class TextTower(torch.nn.Module):
    """Token ids to raw text embeddings: the RoBERTa encoder (:class:`~clap_ws.model.roberta.Roberta` where it
    can serve it) and the projection as one module."""

    def __init__(self, branch: torch.nn.Module, projection: torch.nn.Module):
        super().__init__()
        self.branch = Roberta(branch) if Roberta.can_serve(branch) else branch
        self.projection = projection

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
