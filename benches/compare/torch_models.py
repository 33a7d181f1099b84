"""PyTorch references of the three cellmorph models, built from the same
safetensors state_dicts that cellmorph loads (docs/MODELS.md).

Imported only when torch is installed. Every builder takes a dict
name -> numpy array (see st.py) and returns an eval-mode nn.Module on the CPU;
the caller moves it to its device.
"""
import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def _load(module, weights, prefix=""):
    sd = {}
    for k, v in weights.items():
        if prefix and not k.startswith(prefix):
            continue
        sd[k[len(prefix):]] = torch.from_numpy(np.ascontiguousarray(v))
    missing, unexpected = module.load_state_dict(sd, strict=False)
    # num_batches_tracked may be absent from a file; everything else must match
    missing = [m for m in missing if not m.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return module.eval()


# ---------------------------------------------------------------- DenseNet (§2)

class _DenseLayer(nn.Module):
    def __init__(self, c_in, growth, bn_size):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c_in, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False)

    def forward(self, x):
        y = self.conv1(self.relu1(self.norm1(x)))
        return torch.cat([x, self.conv2(self.relu2(self.norm2(y)))], 1)


class TorchvisionStyleDenseNet(nn.Module):
    """torchvision's DenseNet layout and state_dict names (features.conv0 …
    norm5), for machines without torchvision. Each dense layer concatenates
    its output to its input (torchvision keeps a list and concatenates before
    each layer: the same arithmetic). drop_rate must be 0; the classifier is
    replaced by the caller."""

    def __init__(self, growth_rate, block_config, num_init_features, bn_size, drop_rate, num_classes):
        super().__init__()
        assert drop_rate == 0.0
        f = nn.Sequential()
        f.add_module("conv0", nn.Conv2d(3, num_init_features, 7, stride=2, padding=3, bias=False))
        f.add_module("norm0", nn.BatchNorm2d(num_init_features))
        f.add_module("relu0", nn.ReLU(inplace=True))
        f.add_module("pool0", nn.MaxPool2d(3, stride=2, padding=1))
        c = num_init_features
        for b, layers in enumerate(block_config, 1):
            block = nn.Sequential()
            for l in range(1, layers + 1):
                block.add_module(f"denselayer{l}", _DenseLayer(c, growth_rate, bn_size))
                c += growth_rate
            f.add_module(f"denseblock{b}", block)
            if b < len(block_config):
                t = nn.Sequential()
                t.add_module("norm", nn.BatchNorm2d(c))
                t.add_module("relu", nn.ReLU(inplace=True))
                t.add_module("conv", nn.Conv2d(c, c // 2, 1, bias=False))
                t.add_module("pool", nn.AvgPool2d(2, stride=2))
                f.add_module(f"transition{b}", t)
                c //= 2
        f.add_module("norm5", nn.BatchNorm2d(c))
        self.features = f
        self.classifier = nn.Linear(c, num_classes)


class DenseNetKim(nn.Module):
    """torchvision DenseNet features + a `classifier` Linear or Sequential head.
    forward returns (logits, probs)."""

    def __init__(self, weights):
        super().__init__()
        try:
            from torchvision.models import DenseNet
        except ImportError:  # no torchvision: the same modules, written here
            DenseNet = TorchvisionStyleDenseNet

        blocks = []
        b = 1
        while any(k.startswith(f"features.denseblock{b}.") for k in weights):
            layers = {int(m.group(1)) for k in weights
                      for m in [re.match(rf"features\.denseblock{b}\.denselayer(\d+)\.", k)] if m}
            blocks.append(max(layers))
            b += 1
        init = weights["features.conv0.weight"].shape[0]
        growth = weights["features.denseblock1.denselayer1.conv2.weight"].shape[0]
        bn_size = weights["features.denseblock1.denselayer1.conv1.weight"].shape[0] // growth
        net = DenseNet(growth_rate=growth, block_config=tuple(blocks), num_init_features=init,
                       bn_size=bn_size, drop_rate=0.0, num_classes=2)
        self.features = net.features
        if "classifier.weight" in weights:
            w = weights["classifier.weight"]
            self.classifier = nn.Linear(w.shape[1], w.shape[0])
        else:
            idx = sorted({int(k.split(".")[1]) for k in weights if k.startswith("classifier.")})
            mods = []
            for j, i in enumerate(idx):
                while len(mods) < i:
                    # between two Linear layers: ReLU first, then Dropout (eval: identity)
                    prev_linear = mods and isinstance(mods[-1], nn.Linear)
                    mods.append(nn.ReLU() if prev_linear else nn.Dropout(0.0))
                w = weights[f"classifier.{i}.weight"]
                mods.append(nn.Linear(w.shape[1], w.shape[0]))
            self.classifier = nn.Sequential(*mods)
        _load(self, weights)

    def forward(self, x):
        f = self.features(x)
        p = torch.flatten(F.adaptive_avg_pool2d(F.relu(f), 1), 1)
        logits = self.classifier(p)
        return logits, torch.softmax(logits.float(), dim=1)

    def features_pooled(self, x):
        f = self.features(x)
        return f, torch.flatten(F.adaptive_avg_pool2d(F.relu(f), 1), 1)


# ------------------------------------------------------------------ VQ-VAE-2 (§1)
# The vq-vae-2-pytorch layout (rosinality), inference only.

class ResBlock(nn.Module):
    def __init__(self, c, r):
        super().__init__()
        self.conv = nn.Sequential(nn.ReLU(), nn.Conv2d(c, r, 3, padding=1), nn.ReLU(), nn.Conv2d(r, c, 1))

    def forward(self, x):
        return x + self.conv(x)


class Encoder(nn.Module):
    def __init__(self, cin, c, n_res, r, stride):
        super().__init__()
        if stride == 4:
            blocks = [nn.Conv2d(cin, c // 2, 4, stride=2, padding=1), nn.ReLU(inplace=True),
                      nn.Conv2d(c // 2, c, 4, stride=2, padding=1), nn.ReLU(inplace=True),
                      nn.Conv2d(c, c, 3, padding=1)]
        else:
            blocks = [nn.Conv2d(cin, c // 2, 4, stride=2, padding=1), nn.ReLU(inplace=True),
                      nn.Conv2d(c // 2, c, 3, padding=1)]
        blocks += [ResBlock(c, r) for _ in range(n_res)]
        blocks.append(nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(x)


class Decoder(nn.Module):
    def __init__(self, cin, cout, c, n_res, r, stride):
        super().__init__()
        blocks = [nn.Conv2d(cin, c, 3, padding=1)]
        blocks += [ResBlock(c, r) for _ in range(n_res)]
        blocks.append(nn.ReLU(inplace=True))
        if stride == 4:
            blocks += [nn.ConvTranspose2d(c, c // 2, 4, stride=2, padding=1), nn.ReLU(inplace=True),
                       nn.ConvTranspose2d(c // 2, cout, 4, stride=2, padding=1)]
        else:
            blocks.append(nn.ConvTranspose2d(c, cout, 4, stride=2, padding=1))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(x)


class Quantize(nn.Module):
    def __init__(self, dim, n_embed):
        super().__init__()
        self.dim, self.n_embed = dim, n_embed
        # True: the distances in f32 even under autocast (a variant the harness
        # times beside plain autocast, which computes them in bf16/f16)
        self.force_f32 = False
        self.register_buffer("embed", torch.zeros(dim, n_embed))
        self.register_buffer("cluster_size", torch.zeros(n_embed))
        self.register_buffer("embed_avg", torch.zeros(dim, n_embed))

    def forward(self, x):  # x: [..., dim] channels last, as in vq-vae-2-pytorch
        if self.force_f32 and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self._forward(x.float())
        return self._forward(x)

    def _forward(self, x):
        flatten = x.reshape(-1, self.dim)
        dist = (flatten.pow(2).sum(1, keepdim=True) - 2 * flatten @ self.embed
                + self.embed.pow(2).sum(0, keepdim=True))
        _, embed_ind = (-dist).max(1)
        embed_ind = embed_ind.view(*x.shape[:-1])
        quantize = F.embedding(embed_ind, self.embed.transpose(0, 1))
        return quantize, embed_ind


class VQVAE2(nn.Module):
    def __init__(self, weights):
        super().__init__()
        w = weights
        in_channel = w["enc_b.blocks.0.weight"].shape[1]
        channel = w["enc_b.blocks.2.weight"].shape[0]
        r = w["enc_b.blocks.5.conv.1.weight"].shape[0]
        n_res = len({k.split(".")[2] for k in w if k.startswith("enc_b.blocks.") and ".conv." in k})
        embed_dim, n_embed = w["quantize_t.embed"].shape
        self.n_embed = n_embed
        self.enc_b = Encoder(in_channel, channel, n_res, r, 4)
        self.enc_t = Encoder(channel, channel, n_res, r, 2)
        self.quantize_conv_t = nn.Conv2d(channel, embed_dim, 1)
        self.quantize_t = Quantize(embed_dim, n_embed)
        self.dec_t = Decoder(embed_dim, embed_dim, channel, n_res, r, 2)
        self.quantize_conv_b = nn.Conv2d(embed_dim + channel, embed_dim, 1)
        self.quantize_b = Quantize(embed_dim, n_embed)
        self.upsample_t = nn.ConvTranspose2d(embed_dim, embed_dim, 4, stride=2, padding=1)
        self.dec = Decoder(2 * embed_dim, in_channel, channel, n_res, r, 4)
        _load(self, weights)

    def encode(self, x):
        enc_b = self.enc_b(x)
        enc_t = self.enc_t(enc_b)
        quant_t, id_t = self.quantize_t(self.quantize_conv_t(enc_t).permute(0, 2, 3, 1))
        quant_t = quant_t.permute(0, 3, 1, 2)
        dec_t = self.dec_t(quant_t)
        enc_b2 = torch.cat([dec_t.to(enc_b.dtype), enc_b], 1)
        quant_b, id_b = self.quantize_b(self.quantize_conv_b(enc_b2).permute(0, 2, 3, 1))
        return quant_t, quant_b.permute(0, 3, 1, 2), id_t, id_b, enc_b, enc_t

    def profile(self, x):
        """The `cellmorph bench vqvae2-profile` workload: codes and per-patch
        code histograms [b, n_embed] (bincount with per-patch offsets)."""
        _, _, id_t, id_b, _, _ = self.encode(x)
        return id_t, id_b, per_patch_hist(id_t, self.n_embed), per_patch_hist(id_b, self.n_embed)


def _quantize_train(q, x, decay=0.99, eps=1e-5):
    """vq-vae-2-pytorch's Quantize.forward in training mode: codes from the
    codebook before the update, the EMA update, the latent loss and the
    straight-through output. x: [..., dim] channels last."""
    flatten = x.reshape(-1, q.dim)
    dist = (flatten.pow(2).sum(1, keepdim=True) - 2 * flatten @ q.embed
            + q.embed.pow(2).sum(0, keepdim=True))
    _, ind = (-dist).max(1)
    onehot = F.one_hot(ind, q.n_embed).type(flatten.dtype)
    ind = ind.view(*x.shape[:-1])
    quant = F.embedding(ind, q.embed.transpose(0, 1))
    with torch.no_grad():
        q.cluster_size.mul_(decay).add_(onehot.sum(0), alpha=1 - decay)
        q.embed_avg.mul_(decay).add_(flatten.transpose(0, 1) @ onehot, alpha=1 - decay)
        n = q.cluster_size.sum()
        cs = (q.cluster_size + eps) / (n + q.n_embed * eps) * n
        q.embed.copy_(q.embed_avg / cs.unsqueeze(0))
    diff = (quant.detach() - x).pow(2).mean()
    return x + (quant - x).detach(), diff, ind


def vqvae2_train_step(model, opt, x, latent_loss_weight=0.25):
    """One step of the vq-vae-2-pytorch recipe (docs/MODELS.md §4): forward
    with straight-through quantizers and their EMA updates, loss = MSE +
    0.25·(diff_t + diff_b), backward, one optimizer step. Returns (loss,
    id_t, id_b)."""
    opt.zero_grad(set_to_none=True)
    enc_b = model.enc_b(x)
    enc_t = model.enc_t(enc_b)
    q_t, diff_t, id_t = _quantize_train(model.quantize_t, model.quantize_conv_t(enc_t).permute(0, 2, 3, 1))
    q_t = q_t.permute(0, 3, 1, 2)
    dec_t = model.dec_t(q_t)
    pre_b = model.quantize_conv_b(torch.cat([dec_t, enc_b], 1)).permute(0, 2, 3, 1)
    q_b, diff_b, id_b = _quantize_train(model.quantize_b, pre_b)
    q_b = q_b.permute(0, 3, 1, 2)
    dec = model.dec(torch.cat([model.upsample_t(q_t), q_b], 1))
    loss = F.mse_loss(dec, x) + latent_loss_weight * (diff_t + diff_b)
    loss.backward()
    opt.step()
    return loss.detach(), id_t, id_b


def per_patch_hist(ids, n_embed):
    b = ids.shape[0]
    off = torch.arange(b, device=ids.device).view(b, *([1] * (ids.dim() - 1))) * n_embed
    return torch.bincount((ids + off).reshape(-1), minlength=b * n_embed).view(b, n_embed)


# ---------------------------------------------------------------- CP2Image (§3)

def _sn_weight(weights, prefix):
    """Spectral-normalized weight with the stored u and v: W / (uᵀ W_mat v)."""
    w = weights[prefix + ".weight_orig"]
    u, v = weights[prefix + ".weight_u"], weights[prefix + ".weight_v"]
    sigma = float(u.astype(np.float64) @ (w.reshape(w.shape[0], -1).astype(np.float64) @ v.astype(np.float64)))
    return (w / np.float32(sigma)).astype(np.float32)


def _plain(weights):
    """Replaces spectral-norm triples (weight_orig, weight_u, weight_v) by a plain weight."""
    out = {}
    for k, v in weights.items():
        if k.endswith(".weight_orig"):
            out[k[: -len("_orig")]] = _sn_weight(weights, k[: -len(".weight_orig")])
        elif k.endswith(".weight_u") or k.endswith(".weight_v"):
            continue
        else:
            out[k] = v
    return out


class CP2ImageGenerator(nn.Module):
    def __init__(self, weights):
        super().__init__()
        w = _plain(weights)
        nb = len({k.split(".")[1] for k in w if k.startswith("blocks.")})
        chans = [w["blocks.0.conv.weight"].shape[1]] + [w[f"blocks.{i}.conv.weight"].shape[0] for i in range(nb)]
        self.c0 = chans[0]
        self.fc = nn.Linear(w["fc.weight"].shape[1], w["fc.weight"].shape[0])
        self.blocks = nn.ModuleList()
        for i in range(nb):
            blk = nn.Module()
            blk.conv = nn.Conv2d(chans[i], chans[i + 1], 3, padding=1)
            blk.bn = nn.BatchNorm2d(chans[i + 1])
            self.blocks.append(blk)
        self.out = nn.Conv2d(chans[-1], w["out.weight"].shape[0], 3, padding=1)
        _load(self, w)

    def forward(self, z):
        s = int(round((self.fc.out_features // self.c0) ** 0.5))
        x = self.fc(z).view(z.shape[0], self.c0, s, s)
        for blk in self.blocks:
            x = F.interpolate(F.leaky_relu(blk.bn(blk.conv(x)), 0.2), scale_factor=2, mode="nearest")
        return torch.sigmoid(self.out(x))


# ------------------------------------------------------------ training steps (§4)

def densenet_train_step(model, opt, x, labels, class_weights):
    """One step of `screen train --unfreeze all` (docs/MODELS.md §2, §4):
    the whole network in train mode (batch-statistics BN), cross-entropy
    weighted by class, backward, one optimizer step. The head's Dropout is
    p = 0 here, as in `cellmorph bench densenet-train-step`. Returns (loss,
    logits)."""
    opt.zero_grad(set_to_none=True)
    logits, _ = model(x)
    loss = F.cross_entropy(logits, labels, weight=class_weights)
    loss.backward()
    opt.step()
    return loss.detach(), logits.detach()


class CP2ImageDiscriminator(nn.Module):
    """docs/MODELS.md §3: `blocks.{i}` = spectral-norm conv3×3, BN,
    LeakyReLU(0.2), AvgPool2d(2) (the hidden features h_i), then `fc`,
    sigmoid. The convs are torch.nn.utils.spectral_norm modules loaded from
    weight_orig, weight_u, weight_v (one power iteration per training
    forward). forward returns (prob [N, 1], [h_0, …])."""

    def __init__(self, weights):
        super().__init__()
        nb = len({k.split(".")[1] for k in weights if k.startswith("blocks.")})
        chans = [weights["blocks.0.conv.weight_orig"].shape[1]]
        chans += [weights[f"blocks.{i}.conv.weight_orig"].shape[0] for i in range(nb)]
        self.blocks = nn.ModuleList()
        for i in range(nb):
            blk = nn.Module()
            blk.conv = nn.utils.spectral_norm(nn.Conv2d(chans[i], chans[i + 1], 3, padding=1))
            blk.bn = nn.BatchNorm2d(chans[i + 1])
            self.blocks.append(blk)
        self.fc = nn.Linear(weights["fc.weight"].shape[1], 1)
        _load(self, weights)

    def forward(self, x):
        hidden = []
        for blk in self.blocks:
            x = F.avg_pool2d(F.leaky_relu(blk.bn(blk.conv(x)), 0.2), 2)
            hidden.append(x)
        return torch.sigmoid(self.fc(torch.flatten(x, 1))), hidden


def cp2image_train_step(gen, disc, opt_g, opt_d, z, x, x_real):
    """One step of `cellmorph cp2image train` (docs/MODELS.md §3, §4), both
    networks in train mode. Generator: MSE(G(z), x) + Σ_i MSE(h_i(G(z)),
    h_i(x).detach()) (D called on G(z) first, then on x: the spectral norm's
    u, v advance per call), only G stepped. Discriminator, with the updated
    G: BCE(D(x_real), 1) + BCE(D(G(z).detach()), 0). Returns (loss_g,
    loss_d), each before its update."""
    opt_g.zero_grad(set_to_none=True)
    fake = gen(z)
    _, h_fake = disc(fake)
    _, h_real = disc(x)
    loss_g = F.mse_loss(fake, x)
    for a, b in zip(h_fake, h_real):
        loss_g = loss_g + F.mse_loss(a, b.detach())
    loss_g.backward()
    opt_g.step()
    opt_d.zero_grad(set_to_none=True)
    with torch.no_grad():
        fake = gen(z)
    p_real, _ = disc(x_real)
    p_fake, _ = disc(fake)
    loss_d = (F.binary_cross_entropy(p_real, torch.ones_like(p_real))
              + F.binary_cross_entropy(p_fake, torch.zeros_like(p_fake)))
    loss_d.backward()
    opt_d.step()
    return loss_g.detach(), loss_d.detach()
