"""Toy-scale replication of the paper's claims (arXiv 2602.08503, Tables 2-3): every arm trained
for real on the tiny Qwen3-VL, on a harder dot-counting task, from an honest cold start.

    .venv/bin/python bench/toy_replication.py                  # rare regime: the experiment (resumes)
    .venv/bin/python bench/toy_replication.py --arms octopus --seeds 3 --out /tmp/re  # one job, from nothing
    .venv/bin/python bench/toy_replication.py --quick          # 1 seed, 4 arms, 30 steps: 12 min
    .venv/bin/python bench/toy_replication.py --aggregate      # the tables again from the job files
    .venv/bin/python bench/toy_replication.py --smoke --out /tmp/toy   # every stage, 2 steps (CI)
    .venv/bin/python bench/toy_replication.py --regime dense --seeds 0,1,2   # the committed run

Two regimes, one per cold start (Sec. 4.1 in miniature: o1 from the policy, o2 from an oracle
"stronger model" that reads o1 and the truth, SFT on o1 + SC + o2 with the vision tower frozen):

  rare (default): the paper's regime. The base policy (a well-formed answer first, then the
      skill, stopped early) samples o1 at the training temperature; the oracle writes the truth
      with probability q and otherwise restates o1's answer; no o2 is filtered; every arm and
      the cold start read the same plain instruction (`RARE_PROMPT`). Accepted per seed only by measurement on the dev set (T 1.0, every dev
      prompt x 8): well-formed o1 + SC + o2 >= 0.9, w->c <= 2% of generated rollouts, SFT only
      within 0.02 of the base policy, base accuracy 0.35-0.6 with format >= 0.95 (`REGIME`).
      Every result is a job file under `--out`/jobs (one cold start, one seed's start
      evaluations, one arm x seed x learning rate), written when the job ends, with the commit
      it ran from and the sha256 of the checkpoints it made or started from; a job whose file
      exists is skipped, and a cold start whose cache is gone is rebuilt: on the same machine
      bit for bit, on another one (other CPU kernels, `cpu_kernels`) it differs, and the seed
      runs again from the rebuild (its old jobs kept under attempts/): a seed is one
      machine's. Outputs: runs.csv, calibration.json, lr_grid.json, claims.csv, compute.csv,
      report.md.
  dense: the committed experiment (bench/results/toy_*): o1 at T 0.6, an always-right o2, only
      correct o2 kept. w->c in ~30% of generated rollouts: when corrections are dense, which
      ones are spliced cannot matter.

Arms (`ARMS`): each trains for the same number of RL steps with the same shared hyperparameters
(`SHARED`, at the arm's learning rate), differing only in what defines it:

    octopus           Stage I then Stage II (half the steps each), from the cold start
    gspo-n8/-n16      GSPO with the plain prompt and reward, from the base policy (as the paper)
    no-augment        the Octopus recipe, N = n = 8 originals only (both stages)
    random-augment    the Octopus recipe, N - n spliced samples uniformly from the pool
    released-augment  the Octopus recipe with the released code's quotas
    no-stage1         Stage II only, all steps, from the cold start
    no-splice-n16     (rare) the Octopus recipe with n = 16 generated and the 16 originals trained
    gspo-n16-exposed  (rare) GSPO n = 16 from the base policy given as many more plain-answer SFT
                      steps as the cold start took, on its rows' final answers (its exposure)
    octopus-agg-token (rare, diagnostic, run when named) Octopus with Stage II's loss a mean over
                      all tokens (`--agg token`), at Octopus's lr
    sft-only          the cold start, evaluated (no RL)

Rare regime: every arm that starts from the cold start runs at one learning rate
(`COLD_START_RL_LR`, 1e-4), the others at the one a rule chose from a grid (3e-5, 1e-4, 3e-4)
at seed 0 on the dev set (`choose_lr`); dev curves (256 dev prompts, T 0.6) every 10 steps;
the fixed test set (1024 images, disjoint from every training and dev image by a split on the
pixels' hash) sampled 4 times each at T 0.6 on each starting checkpoint and at the end of each
run. Claims: paired differences over seeds with a 95% t-interval, an exact sign-flip p, ties,
and the smallest difference the seeds can detect, pooled and per machine with the arm x machine
interaction (`--aggregate` rewrites them from the job files). Each job runs in its own process
(one vLLM engine and process group), at most `--parallel` at once, one thread each.
"""
