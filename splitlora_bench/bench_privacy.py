"""Privacy: what an honest-but-curious server recovers from the real wire of a short SplitLoRA run, and what each
defense costs in validation loss at the same training budget.

Each setting (split mode, split layer K, codec, defense) is one real run: a server and one client in this process
over loopback gRPC, the client trained through `splitlora_client.trainer.train` with its channel recorded
(`privacy_wire.Capture`). The attacks (`privacy_attacks`) see only what the server received, decoded as the server
decodes it; the ground truth is the client's own batch stream, replayed and checked against the captured masks."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from safetensors.torch import load_file

from splitlora_bench import assets, privacy_attacks as attacks, report
from splitlora_bench.evaluate import Evaluator
from splitlora_bench.options import BenchConfig, parse_combined
from splitlora_bench.privacy_wire import Capture, forward_steps
from common.data import BatchStream, collate, load_examples
from common.defenses import ActivationDefense, DefenseSettings
from common.lora import adapter_state
from common.split.parts import SplitPart
from splitlora_client.options import TrainConfig
from splitlora_client.local import load_local
from splitlora_client.trainer import train
from splitlora_server.app import start_server
from splitlora_server.options import ServeConfig


@dataclass(frozen=True)
class Setting:
    """One run of the grid."""

    mode: str          # "standard" or "u-shape"
    k: int
    codec: str
    noise: float = 0.0   # noise multiplier sigma (std = sigma x C); 0: no clip, no noise
    nopeek: float = 0.0  # NoPeek weight; 0: off

    @property
    def defense(self) -> str:
        """off, noise, nopeek or nopeek+noise."""
        return "+".join(name for name, on in (("nopeek", self.nopeek), ("noise", self.noise)) if on) or "off"


def grid(cfg: BenchConfig) -> list[Setting]:
    """Undefended at every K (float32), the other codecs at the first K, each defense (and each combined one) at
    each strength at every K, and u-shape at the first K (off, and the strongest noise)."""
    ks, k0 = cfg.privacy_split_layers, cfg.privacy_split_layers[0]
    out = [Setting("standard", k, "float32") for k in ks]
    out += [Setting("standard", k0, codec) for codec in cfg.privacy_codecs if codec != "float32"]
    for k in ks:
        out += [Setting("standard", k, "float32", noise=s) for s in cfg.privacy_noise]
        out += [Setting("standard", k, "float32", nopeek=w) for w in cfg.privacy_nopeek]
        out += [Setting("standard", k, "float32", nopeek=w, noise=s)
                for w, s in map(parse_combined, cfg.privacy_combined)]
    out += [Setting("u-shape", k0, "float32")]
    out += [Setting("u-shape", k0, "float32", noise=max(cfg.privacy_noise))] if cfg.privacy_noise else []
    return out


def defense_of(setting: Setting, clip: float) -> DefenseSettings:
    """The client's defense flags of a setting (`clip`: the per-token norm bound the noise is scaled by)."""
    return DefenseSettings(clip=clip if setting.noise else 0.0, noise=setting.noise, nopeek=setting.nopeek)


def victim_run(cfg: BenchConfig, model: Path, s: Setting, defense: DefenseSettings, work: Path
               ) -> tuple[Capture, TrainConfig, Path]:
    """Train one client through a real server with setting `s`; return what the server received, the client's
    config and the exported whole-model adapter."""
    u = {"split_mode": s.mode, "top_blocks": cfg.privacy_top_blocks if s.mode == "u-shape" else 0}
    common = {"model": str(model), "split_layer": s.k, "lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha,
              "lora_dropout": cfg.lora_dropout, "lora_targets": list(cfg.lora_targets), **u}
    server = ServeConfig(port=0, clients=1, rounds=1, local_steps=cfg.privacy_steps, batch_size=cfg.batch_size,
                         learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps, max_seq_len=cfg.max_seq_len,
                         seed=cfg.seed, codecs=[s.codec], output=str(work / "server"), insecure=True,
                         finish_grace_seconds=0.0, **common)
    running = start_server(server)
    client = TrainConfig(server=f"127.0.0.1:{running.port}", client_id="victim", data=str(assets.train_file(cfg)),
                         seed=cfg.seed, output=str(work / "client"), progress=False, insecure=True, codecs=[s.codec],
                         defense_clip=defense.clip, defense_noise=defense.noise, defense_nopeek=defense.nopeek,
                         **common)
    capture = Capture()
    try:
        train(client, observe=lambda channel: grpc.intercept_channel(channel, capture))
        running.wait_finished()
        exported = running.export()
    finally:
        running.stop(grace=0)
    return capture, client, exported / "adapter_model.safetensors"


def captured(cfg: BenchConfig, capture: Capture, client: TrainConfig, tokenizer) -> attacks.Captured:
    """The last --privacy-sequences sequences the server received (sent after the client's adapter, and NoPeek
    with it, has trained the longest), with the truth from the client's replayed batch stream (its masks must
    equal the captured ones)."""
    stream = BatchStream(load_local(client).encoded(cfg.max_seq_len), cfg.batch_size,
                         tokenizer.pad_token_id, seed=client.seed)
    rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
    for step in forward_steps(capture):
        batch = stream.next_batch()
        if not torch.equal(batch["attention_mask"], step["attention_mask"]):
            raise RuntimeError(f"step {step['step']}: the replayed batch does not match what was sent")
        for row in range(batch["input_ids"].shape[0]):
            keep = step["attention_mask"][row].bool()
            rows.append((step["hidden"][row][keep], batch["input_ids"][row][keep], step["position_ids"][row][keep],
                         step["labels"][row][keep] if step["labels"] is not None else None))
    last = rows[-cfg.privacy_sequences:]
    return attacks.Captured([r[0] for r in last], [r[1] for r in last], [r[2] for r in last], [r[3] for r in last])


def public_batches(cfg: BenchConfig, tokenizer, client_contexts: set) -> list[dict[str, torch.Tensor]]:
    """The attacker's public text: --pretrain-data lines whose context no client example has, batched."""
    lines = [ex for ex in load_examples(cfg.pretrain_data) if ex.context not in client_contexts]
    items = assets.encoded(tokenizer, lines[:cfg.privacy_public_lines], cfg.max_seq_len)
    return [collate(items[i:i + 32], tokenizer.pad_token_id) for i in range(0, len(items), 32)]


class Attacker:
    """The server's side: the base bottom at each K, the clip norm of each K and the decoders it trained."""

    def __init__(self, cfg: BenchConfig, model: Path, public: list[dict[str, torch.Tensor]]) -> None:
        self.cfg, self.public = cfg, public
        self.bottoms = {k: SplitPart(model, "client", k, cfg.lora()).eval() for k in cfg.privacy_split_layers}
        self.clips = {k: self._median_norm(k) for k in cfg.privacy_split_layers}
        self._decoders: dict[tuple[int, DefenseSettings], attacks.Decoder] = {}

    def _median_norm(self, k: int) -> float:
        xs, _ = attacks.public_activations(self.bottoms[k], self.public[:4], ActivationDefense(), self.cfg.seed)
        return float(xs.norm(dim=-1).median())

    def decoder(self, k: int, defense: DefenseSettings) -> attacks.Decoder:
        """A decoder trained on public activations with the victim's noise (NoPeek is the client's training, which
        the attacker cannot replay: it trains on the base's activations)."""
        known = DefenseSettings(defense.clip, defense.noise)
        if (k, known) not in self._decoders:
            xs, ys = attacks.public_activations(self.bottoms[k], self.public, ActivationDefense(known), self.cfg.seed)
            self._decoders[(k, known)] = attacks.train_decoder(xs, ys, self.cfg.privacy_decoder_steps, self.cfg.seed)
        return self._decoders[(k, known)]

    def attack(self, s: Setting, defense: DefenseSettings, cap: attacks.Captured) -> dict[str, float]:
        """Every attack on one run's captured sequences."""
        labels = attacks.label_leakage(cap)
        learned = attacks.learning_inversion(self.decoder(s.k, defense), cap)
        optimized = attacks.optimization_inversion(self.bottoms[s.k], cap, self.cfg.privacy_opt_steps)
        return {"label_token_acc": labels["token_acc"],
                **{f"learn_{m}": v for m, v in learned.items()}, **{f"opt_{m}": v for m, v in optimized.items()}}


def run(cfg: BenchConfig) -> Path:
    """Every setting of the grid: train, capture, attack, evaluate; write privacy.{json,md,png}."""
    model = assets.model_dir(cfg)
    tokenizer = assets.tokenizer_of(model)
    train_examples, held_out = assets.examples(cfg)
    attacker = Attacker(cfg, model, public_batches(cfg, tokenizer, {ex.context for ex in train_examples}))
    evaluator = Evaluator(model, cfg.lora(), assets.encoded(tokenizer, held_out, cfg.max_seq_len),
                          tokenizer.pad_token_id)
    base_loss = evaluator.loss(adapter_state(evaluator.model))  # LoRA B = 0: the base model itself
    results = []
    for i, s in enumerate(grid(cfg)):
        defense = defense_of(s, attacker.clips[s.k])
        capture, client, adapter = victim_run(cfg, model, s, defense, cfg.out_dir / "work" / f"privacy-{i}")
        cap = captured(cfg, capture, client, tokenizer)
        results.append({"setting": {**s.__dict__, "defense": s.defense}, "clip": defense.clip,
                        **attacker.attack(s, defense, cap),
                        "val_loss": evaluator.loss(load_file(str(adapter)))})
    return _report(cfg, model, results, attacker.clips, base_loss)


def _rows(results: list[dict], base_loss: float) -> list[dict]:
    """One table row per run; gain_kept%: how much of the undefended run's fine-tuning gain over the base model
    (its validation loss drop) the run keeps."""
    ref = {(r["setting"]["mode"], r["setting"]["k"]): r["val_loss"] for r in results
           if r["setting"]["defense"] == "off" and r["setting"]["codec"] == "float32"}
    rows = []
    for r in results:
        s = r["setting"]
        base = ref.get((s["mode"], s["k"]))
        strength = [f"w={s['nopeek']:g}"] * bool(s["nopeek"]) + \
            [f"sigma={s['noise']:g} (C={r['clip']:.3g})"] * bool(s["noise"])
        rows.append({"mode": s["mode"], "K": s["k"], "codec": s["codec"],
                     "defense": " ".join([s["defense"], *strength]),
                     "labels_tok%": 100 * r["label_token_acc"],
                     "learn_tok%": 100 * r["learn_token_acc"], "learn_rougeL": r["learn_rouge_l"],
                     "learn_exact%": 100 * r["learn_exact"],
                     "opt_tok%": 100 * r["opt_token_acc"], "opt_rougeL": r["opt_rouge_l"],
                     "opt_exact%": 100 * r["opt_exact"], "val_loss": r["val_loss"],
                     "val_loss_vs_off%": 100 * (r["val_loss"] - base) / base if base else float("nan"),
                     "gain_kept%": 100 * (base_loss - r["val_loss"]) / (base_loss - base) if base and base != base_loss
                     else float("nan")})
    return rows


def _report(cfg: BenchConfig, model: Path, results: list[dict], clips: dict[int, float], base_loss: float
            ) -> Path:
    rows = _rows(results, base_loss)
    met = [r for r in rows if r["learn_tok%"] <= 20 and r["opt_tok%"] <= 20 and r["val_loss_vs_off%"] <= 5]
    series = {}
    for k in cfg.privacy_split_layers:
        pts = sorted((r["setting"]["noise"], r) for r in results if r["setting"]["k"] == k and
                     r["setting"]["mode"] == "standard" and r["setting"]["codec"] == "float32" and
                     r["setting"]["defense"] in ("off", "noise"))
        for name in ("learn", "opt"):
            series[f"{name} K={k}"] = ([p for p, _ in pts], [100 * r[f"{name}_token_acc"] for _, r in pts])
    plots = [p for p in [report.plot(cfg.out_dir / "privacy.png", series, "noise multiplier sigma (x clip C)",
                                     "token recovery %", "Inversion attacks vs Gaussian noise on h_K")] if p]
    notes = [f"{model.name}; one client, {cfg.privacy_steps} steps of batch {cfg.batch_size} per run; the attacks "
             f"use the last {cfg.privacy_sequences} sequences the server received (the client's adapter trained longest)",
             "labels_tok%: target tokens read off the labels field (standard mode sends the text as labels; "
             "u-shape sends none)",
             f"learn: per-token MLP decoder trained {cfg.privacy_decoder_steps} steps on the base's activations of "
             f"{cfg.privacy_public_lines} public lines (disjoint contexts), with the victim's noise; opt: soft "
             f"embeddings optimized {cfg.privacy_opt_steps} steps through the base bottom, snapped to tokens",
             "C: per-token clip norm = the median norm of the base's h_K on public text at that K: " +
             ", ".join(f"K={k}: {c:.3g}" for k, c in clips.items()),
             "val_loss: exported whole-model adapter on the held-out examples; val_loss_vs_off%: against the "
             f"undefended run of the same mode and K; the base model before fine-tuning: {base_loss:.4g}",
             "target (both attacks <= 20% token recovery, val loss within 5% of undefended): " +
             ("met by " + "; ".join(f"{r['mode']} K={r['K']} {r['defense']}" for r in met) if met else "NOT met")]
    return report.write(cfg.out_dir, "privacy", "Privacy: what the server recovers, and what defenses cost",
                        {"results": results, "clips": clips, "base_val_loss": base_loss}, rows, notes, plots)
