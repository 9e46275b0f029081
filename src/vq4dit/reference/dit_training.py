"""Training the embedded reference DiT on the digits with Lightning (epsilon prediction, DDPM noise schedule,
label dropout for classifier-free guidance, EMA weights via Lightning's EMAWeightAveraging)."""

import copy

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, DiTTransformer2DModel
from torch import nn


def dit_init(transformer: DiTTransformer2DModel) -> None:
    """DiT's initialisation: xavier linears, small embeddings, adaLN-Zero (modulation and output start at 0)."""
    for m in transformer.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    w = transformer.pos_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    for block in transformer.transformer_blocks:
        emb = block.norm1.emb
        nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (transformer.proj_out_1, transformer.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def tie_embedders(transformer: DiTTransformer2DModel) -> None:
    """One timestep/label embedder for all blocks, as in the original DiT (diffusers keeps a copy per block)."""
    shared = transformer.transformer_blocks[0].norm1.emb
    for block in transformer.transformer_blocks[1:]:
        block.norm1.emb = shared


def untied_copy(transformer: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """A copy in diffusers' own layout (a separate, equal embedder per block), ready for save_pretrained."""
    out = copy.deepcopy(transformer)
    for block in out.transformer_blocks[1:]:
        block.norm1.emb = copy.deepcopy(out.transformer_blocks[0].norm1.emb)
    return out


class DiffusionTraining(L.LightningModule):
    def __init__(self, transformer: DiTTransformer2DModel, lr: float, label_dropout: float = 0.1,
                 num_train_timesteps: int = 1000):
        super().__init__()
        self.transformer = transformer
        dit_init(transformer)
        tie_embedders(transformer)
        # Labels are dropped here, once per sample; the per-block embedders would each draw their own.
        transformer.transformer_blocks[0].norm1.emb.class_embedder.dropout_prob = 0.0
        self.lr, self.label_dropout = lr, label_dropout
        self.noise = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule="linear")

    def training_step(self, batch, batch_idx):
        x0, y = batch
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.noise.config.num_train_timesteps, (len(x0),), device=x0.device)
        xt = self.noise.add_noise(x0, noise, t)
        null = self.transformer.config.num_embeds_ada_norm
        y = torch.where(torch.rand(len(y), device=y.device) < self.label_dropout, null, y)
        pred = self.transformer(xt, timestep=t, class_labels=y, return_dict=False)[0]
        loss = F.mse_loss(pred[:, : x0.shape[1]], noise)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.transformer.parameters(), lr=self.lr, weight_decay=0.0)
