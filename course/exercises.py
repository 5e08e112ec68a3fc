"""The exercises of the SAGAN teaching kit: what each one blanks in the real code, and how it is checked.

Each exercise is one idea of the paper in one function, or a few lines of one, of the project's
own files. A blank names its place from outside the code, so the reading files carry no markers:
a file, a function by its qualified name, and optionally the first and last statements to blank,
named by how their source text begins (course/make_copy.py finds them with Python's ast module;
the comments just above the first statement go with it). Without `start`, the whole body after
the docstring is blanked; the docstring stays, as the specification.

The check of exercise NAME is every test in test_sagan.py marked NAME (`python -m pytest -q
test_sagan.py -m NAME`). The checks are independent: each exercise's check runs only through its
own blanks (the D- and G-step checks use stand-in networks and losses), so the exercises can be
done in any order. The exception is the last one, whose check trains the model built from all the
others. make_copy.py writes the assignment sheet from this list; course/answers.md answers the
questions by number.

Check times are the tests' own time (pytest --durations), without pytest's start-up; writing
times are estimates for a student who has read the paper's Sec. 3. RESULTS.md gives the
measurements behind them.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Blank:
    file: str  # a file of the project
    function: str  # its qualified name: "attention_map", "SelfAttention.forward"
    todo: str  # what to write, in one line; the NotImplementedError's message
    start: str = ""  # first statement blanked, by how its source begins ("": the body after the docstring)
    stop: str = ""  # last statement blanked, in the same block ("": the end of that block)


@dataclass(frozen=True)
class Exercise:
    name: str  # also its pytest marker
    title: str
    paper: str  # where the idea is in the paper
    blanks: tuple
    task: str  # the assignment sheet's paragraph
    questions: tuple  # the written questions, numbered over all exercises in this order
    write_min: int  # minutes to write (or to look and answer), an estimate
    check_s: float  # seconds the check's tests take (pytest --durations), as RESULTS.md gives them
    needs: tuple = ()  # exercises whose blanks this one's check runs through
    run: str = ""  # what else the budget must hold

    @property
    def budget(self):
        check = f"{self.check_s:g} s" if self.check_s >= 0.01 else "under 0.01 s"
        work = "to write" if self.blanks else "to run, look and answer"
        return ", ".join([f"{self.write_min} min {work} (estimate)"] + ([self.run] if self.run else []) +
                         [f"its tests run in {check}; pytest's start-up (importing torch) adds a few "
                          f"seconds, more on a busy machine"])


EXERCISES = (
    Exercise(
        "attention_map", "The attention map beta", "Sec. 3, Eq. (1)",
        (Blank("sagan.py", "attention_map",
               "return beta (B, N, M), the softmax over the keys i of s_ij = f(x_i)^T g(x_j) (Eq. 1)"),),
        "Write `sagan.attention_map`: from the queries g(x) (B, C', N) and keys f(x) (B, C', M), "
        "the scores s_ij = f(x_i)^T g(x_j) for every query j and key i, and beta, their softmax "
        "over the keys. `SelfAttention.explicit` calls it; Figure 5 draws its rows.",
        ("What are N and M for G's attention layer in the default run (32 px images, attention at "
         "the 16x16 feature maps), and for the paper's attention at the 64x64 feature maps? How many "
         "bytes does the score tensor take at 64x64 and batch 256 in fp32, with the 2x2 pooling of "
         "keys (README, difference 2) and without it?",
         "Each row of beta sums to 1. What does a row look like when a query attends to all keys "
         "alike, and how does `attention_figure` in evaluate.py use that value to decide how much "
         "heat to draw?"),
        write_min=20, check_s=0.0),
    Exercise(
        "gamma", "gamma, the weight of the attention output", "Sec. 3, Eq. (3)",
        (Blank("sagan.py", "new_gamma",
               "return gamma, the learnable scalar of Eq. (3), at the value SAGAN starts it from"),),
        "Write `sagan.new_gamma`: the learnable scalar gamma of Eq. (3), as a parameter of the "
        "block, at the value the paper starts it from. `SelfAttention` and Table 1's "
        "`ResidualControl` both take theirs from it.",
        ("Why does gamma start at 0? What is the block at initialisation, and does gamma still learn "
         "from there (which test shows it)? Where do G's and D's gammas end after the default run?",),
        write_min=10, check_s=0.0),
    Exercise(
        "attention_output", "The attention output", "Sec. 3, Eq. (2) and (3)",
        (Blank("sagan.py", "SelfAttention.forward",
               "map o back to C channels with v (Eq. 2), then y = gamma o + x (Eq. 3)",
               start="o = self.v(", stop="y = "),),
        "Finish `SelfAttention.forward`: o, the attention-weighted values from `explicit` or "
        "`fused`, goes through the output conv v back to C channels (Eq. 2) and is added to the "
        "input, scaled by gamma (Eq. 3).",
        ("What does the fused path (`SelfAttention.fused`) save against `explicit`, in memory and in "
         "time, for one attention block at the paper's size and for the default run?",),
        write_min=15, check_s=0.02),
    Exercise(
        "d_hinge_loss", "D's hinge loss", "Sec. 3, Eq. (4)",
        (Blank("sagan.py", "d_hinge_loss",
               "return the two halves of L_D, E[max(0, 1 - D(x, y))] and E[max(0, 1 + D(G(z), y))] (Eq. 4)"),),
        "Write `d_hinge_loss` from Eq. (4): D's loss as its real and its fake half.",
        ("For which values of D(x, y) does a real image stop contributing to D's gradient, and for "
         "which D(G(z), y) a fake one? Why is G's loss not clipped in the same way?",),
        write_min=10, check_s=0.0),
    Exercise(
        "g_hinge_loss", "G's hinge loss", "Sec. 3, Eq. (4)",
        (Blank("sagan.py", "g_hinge_loss", "return L_G = -E[D(G(z), y)] (Eq. 4)"),),
        "Write `g_hinge_loss` from Eq. (4): the negated mean logit of the fake images.",
        ("In the default run's log.jsonl, what are the mean D(x) and D(G(z)) over the last few "
         "hundred steps, and what do they say about the game between G and D?",),
        write_min=5, check_s=0.0),
    Exercise(
        "conditional_bn", "Conditional batch norm", "Sec. 5 (conditional BN)",
        (Blank("sagan.py", "ConditionalBatchNorm.forward",
               "scale and shift the normalised x by the gain and bias of each sample's class y",
               start="return x * self.gain"),),
        "Finish `ConditionalBatchNorm.forward`: after batch norm, a gain and a bias per class, "
        "picked by each sample's label.",
        ("The gain table starts at exactly 1 and the bias at 0 (README, difference 5). What is G's "
         "conditional batch norm at initialisation, then? Why is D's class embedding spectrally "
         "normalised while G's gain and bias tables are not?",),
        write_min=15, check_s=0.01),
    Exercise(
        "projection", "The projection discriminator", "Sec. 5 (projection D)",
        (Blank("sagan.py", "Discriminator.forward",
               "add the projection term <embed(y), h> to each sample's logit", start="out = out + "),),
        "Finish `Discriminator.forward` with the projection term: D(x, y) = psi(phi(x)) + "
        "<embed(y), phi(x)> (Miyato and Koyama 2018), one dot product per sample.",
        (),
        write_min=10, check_s=0.04),
    Exercise(
        "d_step", "The D step", "Sec. 3, Eq. (4) for D; Sec. 4",
        (Blank("train.py", "GAN.d_step",
               "one D update: G's fake images without a graph, real and fake through D in one batch, "
               "d_hinge_loss, backward, opt_D.step(); return (loss_real, loss_fake, detached logits)"),),
        "Write `GAN.d_step`: for each of `cfg.accum` micro-batches, real images from `batches`, fake "
        "ones from G with fresh z and labels (`self.latents`), both through D in one batch, the hinge "
        "loss, backward; then one optimizer step. Run each forward inside `with self.forward_context(...)` "
        "(its docstring says why), and see `GAN.iteration` for how the results are used.",
        ("Why do the real and the fake images go through D in one batch (README, difference 7)? Why "
         "would that be wrong for a discriminator with batch norm?",
         "Why are the fake images made under torch.no_grad()? If they were not, and nothing was "
         "detached, what would change: G's weights after the iteration, or only the cost?"),
        write_min=40, check_s=0.04),
    Exercise(
        "g_step", "The G step", "Sec. 3, Eq. (4) for G; Sec. 4 (TTUR)",
        (Blank("train.py", "GAN.g_step",
               "one G update with D frozen (eval mode, no gradients): g_hinge_loss of D(G(z), y), "
               "backward, opt_G.step(), D restored; return the loss"),),
        "Write `GAN.g_step`: D frozen (eval mode, so its spectral norm does not iterate, and no "
        "gradients), fresh z and labels, L_G through D, backward into G, one optimizer step, then D "
        "back to training mode with gradients. The two learning rates (TTUR) are set in "
        "`GAN.__init__`: read them there.",
        ("Why is D put in eval mode and frozen during the G step? Name the two things that would "
         "otherwise happen to D.",
         "Where are the two learning rates of TTUR set, and what are they? What happened in a run "
         "without TTUR (`--equal-lr`), and in one without spectral norm in G (`--no-g-sn`)?"),
        write_min=30, check_s=0.05),
    Exercise(
        "fid", "FID", "Sec. 5 (evaluation metrics)",
        (Blank("evaluate.py", "frechet_distance",
               "FID = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2), the last term from the "
               "eigenvalues of the symmetric M = B^T S2 B with S1 = B B^T, no matrix square root",
               start="mu1, sigma1, mu2, sigma2 ="),),
        "Finish `frechet_distance` in float64 through the eigenvalues of a symmetric matrix similar "
        "to S1 S2 (the docstring says which); `significant`, given, drops round-off eigenvalues.",
        ("Why does `frechet_distance` never form sqrt(S1 S2)? What goes wrong with a general matrix "
         "square root, and what does the eigenvalue route cost at d = 2048 against scipy's sqrtm?",),
        write_min=30, check_s=0.14),
    Exercise(
        "inception_score", "The Inception Score", "Sec. 5 (evaluation metrics)",
        (Blank("evaluate.py", "inception_score",
               "per split, exp(E_x KL(p(y|x) || p(y))); return the mean and the population std over "
               "the splits", start="scores = []"),),
        "Finish `inception_score` from the per-split KL divergences; the input handling and "
        "torch-fidelity's fixed shuffle are given.",
        ("What is the Inception Score of predictions that are one-hot and spread evenly over k "
         "classes? What is the largest possible score with the Inception network's 1008 classes, "
         "and why are the samples shuffled before the splits?",),
        write_min=20, check_s=0.09),
    Exercise(
        "train_figure5", "Train the default run and draw Figure 5", "Sec. 5.2, Figure 5",
        (),
        "With every other exercise done (the check trains 2 steps through all of them), train the "
        "default run, `python train.py` (minutes on a 2-core CPU; the console "
        "shows the time left), then draw Figure 5 from it: `python evaluate.py --ckpt "
        "runs/sagan/ckpt.pt --attention --k 3`. Expect the last sample grid "
        "(runs/sagan/samples/) to show the ten classes by colour and, mostly, by shape, each "
        "object beside its mirror image, and Figure 5's query points on a sample's object, on its "
        "mirror image and on the background.",
        ("Where do your run's gammas end (the last line of runs/sagan/log.jsonl)? Compare them with "
         "the reference runs', and say why they need not be equal to the last digit.",
         "What do your Figure 5 maps show? Where does a query point on an object look, and one in "
         "the background? Does a point on one object look at its mirror image?"),
        write_min=25, check_s=0.8,
        needs=("attention_map", "gamma", "attention_output", "d_hinge_loss", "g_hinge_loss", "conditional_bn",
               "projection", "d_step", "g_step"),
        run="7 min or more of training on a 2-core CPU (RESULTS.md)"),
)

BY_NAME = {e.name: e for e in EXERCISES}


def check_command(name):
    return f"python -m pytest -q test_sagan.py -m {name}"
