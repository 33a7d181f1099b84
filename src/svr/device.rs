//! The batched linear SVR on a kernel device (CUDA, or emulated):
//! `kernels/svr.cu`, one warp per problem.
//!
//! [`solve_batch_on`] and [`fit_batch_on`] solve independent problems like
//! [`super::fit_batch`]; [`grid_search_on`] is [`super::grid_search`]. On
//! [`Device::Cpu`] each calls the CPU solver.
//!
//! Design:
//! - The Gram matrices (training × training, and held-out × training for
//!   the scores) are computed on the host in `f64` exactly as the CPU path
//!   computes them, once per row set or fold: with at most
//!   [`DEVICE_MAX_ROWS`] rows they are tiny next to the solves.
//! - One warp solves one dual with libsvm's SMO (the kernel file's header
//!   has the details); a block's 4 warps solve problems on the same Gram
//!   matrix, which sits in shared memory.
//! - The grid search gives each warp one (gene, fold, ε) chain, C ascending,
//!   and stops a chain as soon as a solve never touched the C bound (every
//!   larger C would repeat it bit for bit), as `grid.rs` does. The paper
//!   grid is 7,194 chains, under 3 waves of resident warps on an H100, and
//!   with the paper's data every chain is a single solve (~26 iterations).
//!   The held-out R² is computed on the device; the host only averages the
//!   folds, picks the best setting and refits every gene on all samples in
//!   one more batch.
//! - The kernels repeat every floating-point operation of the CPU solver in
//!   the same order, so β, b, iteration counts, scores and choices equal
//!   the CPU's exactly (up to the sign of a zero intercept).
//!
//! [`crate::Tensor`] has no `f64` element type, so `f64` buffers travel as
//! their bit patterns in `Tensor<i64>` (`backend::buffers`).

use std::collections::HashMap;

use rayon::prelude::*;

use super::grid::{best_index, kfold, Fold, GridInputs};
use super::smo::{self, SmoOutcome};
use super::{
    fit_batch, grid_search, linear_gram, primal_weights, GridOutcome, GridResult, GridSpec,
    GridStats, LinearSvr, SvrFit, SvrParams, SvrProblem,
};
use crate::backend::buffers::{f64_buffer, i64_buffer, int_buffer, read_f64, WarpBlocks};
use crate::backend::{Backend, KernelArg, LaunchCfg};
use crate::device::Device;
use crate::table::Table;
use crate::tensor::Tensor;
use crate::{Error, Result};

/// What an argument that does not fit a kernel `int` is reported against.
const INT_OP: &str = "svr device solver";

/// Most training rows one problem may have on a kernel device (the widest
/// kernel variant, 4 rows per lane of a warp). The CPU device has no limit.
pub const DEVICE_MAX_ROWS: usize = 128;

/// Warps (problems) per block, `kSvrWarps` in the kernel.
const WARPS_PER_BLOCK: usize = 4;

/// Most chain scores one grid launch writes (64 MiB); more genes are split
/// over several launches.
const MAX_SCORES_PER_LAUNCH: usize = 1 << 23;

/// One solved dual.
#[derive(Debug, Clone, PartialEq)]
pub struct DualSolution {
    /// `β_m = α_m − α*_m` per training row, so `f(x) = Σ_m β_m·(x_m·x) + b`.
    pub beta: Vec<f64>,
    /// Intercept, iterations and flags, as [`smo::solve`] reports them.
    pub outcome: SmoOutcome,
}

/// Solves the dual of every problem on `be`'s device: the same results as
/// [`smo::solve`] on each problem's Gram matrix. Problems with the same
/// training rows share one Gram matrix. On a kernel device a problem may
/// have at most [`DEVICE_MAX_ROWS`] training rows.
pub fn solve_batch_on(
    be: &Backend,
    x: &[f64],
    n_features: usize,
    problems: &[SvrProblem],
) -> Result<Vec<DualSolution>> {
    const OP: &str = "svr::solve_batch_on";
    check_problems(OP, be, x, n_features, problems)?;
    let mut set_of_rows: HashMap<&[usize], usize> = HashMap::new();
    let mut row_sets: Vec<&[usize]> = Vec::new();
    let mut duals = Vec::with_capacity(problems.len());
    for p in problems {
        let next = row_sets.len();
        let set = *set_of_rows.entry(p.train_rows.as_slice()).or_insert(next);
        if set == next {
            row_sets.push(&p.train_rows);
        }
        duals.push(Dual {
            set,
            y: &p.y,
            params: p.params,
        });
    }
    let grams: Vec<Vec<f64>> = row_sets
        .par_iter()
        .map(|rows| linear_gram(x, n_features, rows))
        .collect();
    let sets: Vec<GramSet> = grams
        .iter()
        .zip(&row_sets)
        .map(|(gram, rows)| GramSet {
            gram,
            l: rows.len(),
        })
        .collect();
    solve_duals(be, &sets, &duals)
}

/// [`super::fit_batch`] on `be`'s device: one fitted model per problem.
pub fn fit_batch_on(
    be: &Backend,
    x: &[f64],
    n_features: usize,
    problems: &[SvrProblem],
) -> Result<Vec<SvrFit>> {
    if be.device() == Device::Cpu {
        return fit_batch(x, n_features, problems);
    }
    let solutions = solve_batch_on(be, x, n_features, problems)?;
    Ok(problems
        .par_iter()
        .zip(solutions)
        .map(|(p, s)| SvrFit {
            model: LinearSvr {
                w: primal_weights(x, n_features, &p.train_rows, &s.beta),
                b: s.outcome.b,
            },
            iterations: s.outcome.iterations,
            converged: s.outcome.converged,
        })
        .collect())
}

/// [`super::grid_search`] on `be`'s device, with the same results. On a
/// kernel device the samples (the refit's training rows) may number at most
/// [`DEVICE_MAX_ROWS`].
pub fn grid_search_on(
    be: &Backend,
    features: &Table,
    expression: &Table,
    spec: &GridSpec,
) -> Result<GridOutcome> {
    if be.device() == Device::Cpu {
        return grid_search(features, expression, spec);
    }
    let GridInputs {
        n,
        x,
        d,
        genes,
        skipped,
    } = GridInputs::prepare(features, expression, spec)?;
    if n > DEVICE_MAX_ROWS {
        return Err(Error::invalid(format!(
            "grid search on {}: {n} samples, the device solver takes at most {DEVICE_MAX_ROWS} \
             (use the CPU device)",
            be.device()
        )));
    }
    let folds: Vec<Fold> = kfold(n, spec.folds)?
        .into_iter()
        .map(|test| Fold::new(&x.data, d, n, test))
        .collect();
    let (n_folds, n_eps, n_c) = (folds.len(), spec.epsilon.len(), spec.c.len());
    let chains = chain_scores(be, &folds, n, &genes, spec)?;

    let mut stats = GridStats {
        problems: genes.len() * (spec.n_settings() * n_folds + 1),
        ..GridStats::default()
    };
    for counts in chains.counts.chunks_exact(2) {
        stats.smo_solves += counts[0] as usize;
        stats.unconverged += counts[1] as usize;
    }
    // Means and choices exactly as grid.rs computes them.
    let choices: Vec<(Vec<f64>, usize)> = (0..genes.len())
        .map(|g| {
            let mean_scores: Vec<f64> = (0..spec.n_settings())
                .map(|s| {
                    let (ci, e) = (s / n_eps, s % n_eps);
                    let sum: f64 = (0..n_folds)
                        .map(|f| chains.scores[((g * n_folds + f) * n_eps + e) * n_c + ci])
                        .sum();
                    sum / n_folds as f64
                })
                .collect();
            let best = best_index(&mean_scores);
            (mean_scores, best)
        })
        .collect();

    let all_rows: Vec<usize> = (0..n).collect();
    let full_gram = linear_gram(&x.data, d, &all_rows);
    let refits: Vec<Dual> = genes
        .iter()
        .zip(&choices)
        .map(|((_, y), (_, best))| {
            let (c, epsilon) = spec.setting(*best);
            Dual {
                set: 0,
                y,
                params: SvrParams {
                    c,
                    epsilon,
                    tol: spec.tol,
                },
            }
        })
        .collect();
    let solutions = solve_duals(
        be,
        &[GramSet {
            gram: &full_gram,
            l: n,
        }],
        &refits,
    )?;
    let results: Vec<GridResult> = genes
        .into_iter()
        .zip(choices)
        .zip(solutions)
        .map(|(((gene, _), (mean_scores, best)), s)| {
            let (c, epsilon) = spec.setting(best);
            GridResult {
                gene,
                c,
                epsilon,
                cv_score: mean_scores[best],
                mean_scores,
                w: primal_weights(&x.data, d, &all_rows, &s.beta),
                b: s.outcome.b,
                converged: s.outcome.converged,
            }
        })
        .collect();
    stats.smo_solves += results.len();
    stats.unconverged += results.iter().filter(|r| !r.converged).count();
    Ok(GridOutcome {
        results,
        skipped,
        stats,
    })
}

/// A Gram matrix shared by problems: `l × l`, row-major.
struct GramSet<'a> {
    gram: &'a [f64],
    l: usize,
}

/// One dual to solve on the Gram matrix `set`.
struct Dual<'a> {
    set: usize,
    y: &'a [f64],
    params: SvrParams,
}

/// Checks what [`super::fit_batch`] checks, plus the row limit of kernel
/// devices.
fn check_problems(
    op: &'static str,
    be: &Backend,
    x: &[f64],
    n_features: usize,
    problems: &[SvrProblem],
) -> Result<()> {
    if n_features == 0 || x.is_empty() || !x.len().is_multiple_of(n_features) {
        return Err(Error::shape(
            op,
            format!(
                "{} values are not a non-empty matrix of {n_features} columns",
                x.len()
            ),
        ));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(format!(
            "{op}: feature matrix: non-finite value {} at index {i}",
            x[i]
        )));
    }
    let n_rows = x.len() / n_features;
    for (p, problem) in problems.iter().enumerate() {
        problem.params.validate()?;
        let (rows, l) = (&problem.train_rows, problem.train_rows.len());
        if l == 0 {
            return Err(Error::invalid(format!("SVR problem {p}: no training rows")));
        }
        if be.device() != Device::Cpu && l > DEVICE_MAX_ROWS {
            return Err(Error::shape(
                op,
                format!(
                    "problem {p}: {l} training rows, the device solver takes at most \
                     {DEVICE_MAX_ROWS} (use the CPU device)"
                ),
            ));
        }
        if let Some(&r) = rows.iter().find(|&&r| r >= n_rows) {
            return Err(Error::shape(
                op,
                format!("problem {p}: training row {r} of a {n_rows}-row matrix"),
            ));
        }
        if problem.y.len() != l {
            return Err(Error::shape(
                op,
                format!(
                    "problem {p}: {} targets for {l} training rows",
                    problem.y.len()
                ),
            ));
        }
        if let Some(i) = problem.y.iter().position(|v| !v.is_finite()) {
            return Err(Error::invalid(format!(
                "SVR problem {p}: target: non-finite value {} at index {i}",
                problem.y[i]
            )));
        }
    }
    Ok(())
}

/// Solves every dual: [`smo::solve`] on the CPU device, else one
/// `svr_batch_*` launch per kernel variant needed.
fn solve_duals(be: &Backend, sets: &[GramSet], duals: &[Dual]) -> Result<Vec<DualSolution>> {
    if be.device() == Device::Cpu {
        return Ok(duals
            .par_iter()
            .map_init(smo::Workspace::default, |ws, dual| {
                let set = &sets[dual.set];
                let mut beta = vec![0.0; set.l];
                let p = &dual.params;
                let outcome = smo::solve(
                    set.gram,
                    set.l,
                    dual.y,
                    p.c,
                    p.epsilon,
                    p.tol,
                    smo::default_max_iter(set.l),
                    ws,
                    &mut beta,
                );
                DualSolution { beta, outcome }
            })
            .collect());
    }
    let mut out: Vec<Option<DualSolution>> = vec![None; duals.len()];
    let mut by_variant: HashMap<&'static str, Vec<usize>> = HashMap::new();
    for (k, dual) in duals.iter().enumerate() {
        let v = variant("svr::solve_batch_on", sets[dual.set].l)?;
        by_variant.entry(v).or_default().push(k);
    }
    for (v, members) in by_variant {
        launch_batch(be, v, sets, duals, &members, &mut out)?;
    }
    out.into_iter()
        .map(|s| s.ok_or_else(|| Error::invalid("svr::solve_batch_on: a problem was not solved")))
        .collect()
}

/// The kernel variant (`l32`, `l64`, `l128`) for problems of at most `l`
/// training rows.
fn variant(op: &'static str, l: usize) -> Result<&'static str> {
    match l {
        0..=32 => Ok("l32"),
        33..=64 => Ok("l64"),
        65..=DEVICE_MAX_ROWS => Ok("l128"),
        _ => Err(Error::shape(
            op,
            format!("{l} training rows, the device solver takes at most {DEVICE_MAX_ROWS}"),
        )),
    }
}

/// Dynamic shared memory of a block whose Gram matrices have at most `lmax`
/// rows: the matrix, then 4·lmax doubles of scratch per warp (at most
/// 144 KiB, within every supported GPU's limit).
fn shared_bytes(lmax: usize) -> u32 {
    ((lmax * lmax + WARPS_PER_BLOCK * 4 * lmax) * std::mem::size_of::<f64>()) as u32
}

/// `duals[members]` with one `svr_batch_<v>_f64` launch, results into `out`.
fn launch_batch(
    be: &Backend,
    v: &str,
    sets: &[GramSet],
    duals: &[Dual],
    members: &[usize],
    out: &mut [Option<DualSolution>],
) -> Result<()> {
    // Problems sorted by Gram set (stable), so that a block's are adjacent.
    let mut order = members.to_vec();
    order.sort_by_key(|&k| duals[k].set);
    let mut local_set: HashMap<usize, usize> = HashMap::new();
    let (mut gram, mut set_off, mut set_l, mut set_max_iter) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut blocks = WarpBlocks::new(WARPS_PER_BLOCK);
    let (mut y, mut y_off, mut c, mut eps, mut tol) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut lmax = 1;
    for (p, &k) in order.iter().enumerate() {
        let dual = &duals[k];
        let set = &sets[dual.set];
        let next = set_l.len();
        let s = *local_set.entry(dual.set).or_insert(next);
        if s == next {
            set_off.push(gram.len() as i64);
            gram.extend_from_slice(set.gram);
            set_l.push(set.l);
            set_max_iter.push(smo::default_max_iter(set.l) as i64);
            lmax = lmax.max(set.l);
        }
        blocks.push(s, p);
        y_off.push(y.len() as i64);
        y.extend_from_slice(dual.y);
        c.push(dual.params.c);
        eps.push(dual.params.epsilon);
        tol.push(dual.params.tol);
    }
    let n_blocks = u32::try_from(blocks.set.len())
        .map_err(|_| Error::invalid("svr::solve_batch_on: too many problems for one launch"))?;
    let ints = |what: &str, v: &[usize]| -> Result<Tensor<i32>> { int_buffer(be, INT_OP, what, v) };
    let gram_t = f64_buffer(be, &gram)?;
    let set_off_t = i64_buffer(be, &set_off)?;
    let set_l_t = ints("training rows", &set_l)?;
    let set_max_iter_t = i64_buffer(be, &set_max_iter)?;
    let block_set_t = ints("Gram set index", &blocks.set)?;
    let block_first_t = ints("problem index", &blocks.first)?;
    let block_count_t = ints("block size", &blocks.count)?;
    let y_off_t = i64_buffer(be, &y_off)?;
    let y_t = f64_buffer(be, &y)?;
    let c_t = f64_buffer(be, &c)?;
    let eps_t = f64_buffer(be, &eps)?;
    let tol_t = f64_buffer(be, &tol)?;
    let mut beta_t = f64_buffer(be, &vec![0.0; y.len()])?;
    let mut b_t = f64_buffer(be, &vec![0.0; order.len()])?;
    let mut iter_t = i64_buffer(be, &vec![0; order.len()])?;
    let mut flags_t = Tensor::<i32>::zeros(be, &[order.len().max(1)])?;
    let cfg = LaunchCfg {
        grid: (n_blocks, 1, 1),
        block: ((32 * WARPS_PER_BLOCK) as u32, 1, 1),
        shared_bytes: shared_bytes(lmax),
    };
    let args = [
        gram_t.arg(),
        set_off_t.arg(),
        set_l_t.arg(),
        set_max_iter_t.arg(),
        block_set_t.arg(),
        block_first_t.arg(),
        block_count_t.arg(),
        y_off_t.arg(),
        y_t.arg(),
        c_t.arg(),
        eps_t.arg(),
        tol_t.arg(),
        beta_t.arg_mut(),
        b_t.arg_mut(),
        iter_t.arg_mut(),
        flags_t.arg_mut(),
    ];
    let kernel = format!("svr_batch_{v}_f64");
    // SAFETY: every buffer was just made on be's device and outlives the
    // launch (to_vec below synchronizes). Block b reads set block_set[b]
    // (< set count) at set_off with set_l ≤ lmax rows, and problems
    // block_first[b] + w for w < block_count[b], all < the problem count,
    // whose l targets at y_off lie inside y; it writes beta at the same
    // offsets and b, iterations, flags at the problem index. Shared memory
    // holds lmax² + 4 warps × 4·lmax doubles, what the kernel indexes for
    // l ≤ lmax; every set has l ≤ the variant's row limit. The argument list
    // matches svr_batch_<v>_f64's parameters in order and type.
    unsafe { be.launch(&kernel, cfg, &args)? };
    let (beta, b) = (read_f64(&beta_t)?, read_f64(&b_t)?);
    let (iters, flags) = (iter_t.to_vec()?, flags_t.to_vec()?);
    for (p, &k) in order.iter().enumerate() {
        let off = y_off[p] as usize;
        let l = duals[k].y.len();
        out[k] = Some(DualSolution {
            beta: beta[off..off + l].to_vec(),
            outcome: SmoOutcome {
                b: b[p],
                iterations: iters[p] as usize,
                converged: flags[p] & 1 != 0,
                c_bound_active: flags[p] & 2 != 0,
            },
        });
    }
    Ok(())
}

/// Held-out R² of every (gene, fold, ε, C), `[gene][fold][ε][C]` with C in
/// the spec's order, and per chain (gene, fold, ε) the SMO solves and the
/// unconverged settings.
struct ChainScores {
    scores: Vec<f64>,
    counts: Vec<i32>,
}

/// Runs the `svr_grid_*` kernel over every gene, in launches of at most
/// [`MAX_SCORES_PER_LAUNCH`] scores.
fn chain_scores(
    be: &Backend,
    folds: &[Fold],
    n: usize,
    genes: &[(String, Vec<f64>)],
    spec: &GridSpec,
) -> Result<ChainScores> {
    const OP: &str = "svr::grid_search_on";
    let (n_folds, n_eps, n_c) = (folds.len(), spec.epsilon.len(), spec.c.len());
    let lmax = folds.iter().map(|f| f.train.len()).max().unwrap_or(1);
    let nt_max = folds.iter().map(|f| f.test.len()).max().unwrap_or(1);
    let v = variant(OP, lmax)?;
    let mut gram = vec![0.0; n_folds * lmax * lmax];
    let mut cross = vec![0.0; n_folds * nt_max * lmax];
    let mut rows = Vec::with_capacity(n_folds * n);
    for (f, fold) in folds.iter().enumerate() {
        gram[f * lmax * lmax..][..fold.gram.len()].copy_from_slice(&fold.gram);
        cross[f * nt_max * lmax..][..fold.cross.len()].copy_from_slice(&fold.cross);
        rows.extend(fold.train.iter().chain(&fold.test));
    }
    let fold_l: Vec<usize> = folds.iter().map(|f| f.train.len()).collect();
    let max_iter: Vec<i64> = fold_l
        .iter()
        .map(|&l| smo::default_max_iter(l) as i64)
        .collect();
    // C ascending inside a chain; the stable sort keeps equal values in grid
    // order, as grid.rs.
    let mut c_order: Vec<usize> = (0..n_c).collect();
    c_order.sort_by(|&a, &b| spec.c[a].total_cmp(&spec.c[b]));
    let c_sorted: Vec<f64> = c_order.iter().map(|&i| spec.c[i]).collect();

    let gram_t = f64_buffer(be, &gram)?;
    let cross_t = f64_buffer(be, &cross)?;
    let rows_t = int_buffer(be, INT_OP, "sample index", &rows)?;
    let fold_l_t = int_buffer(be, INT_OP, "training rows", &fold_l)?;
    let max_iter_t = i64_buffer(be, &max_iter)?;
    let c_sorted_t = f64_buffer(be, &c_sorted)?;
    let c_index_t = int_buffer(be, INT_OP, "C index", &c_order)?;
    let eps_t = f64_buffer(be, &spec.epsilon)?;

    let per_gene = n_folds * n_eps * n_c;
    let genes_per_launch = (MAX_SCORES_PER_LAUNCH / per_gene).max(1);
    let mut scores = Vec::with_capacity(genes.len() * per_gene);
    let mut counts = Vec::with_capacity(genes.len() * n_folds * n_eps * 2);
    for chunk in genes.chunks(genes_per_launch) {
        let y: Vec<f64> = chunk.iter().flat_map(|(_, y)| y.iter().copied()).collect();
        let y_t = f64_buffer(be, &y)?;
        let mut scores_t = f64_buffer(be, &vec![0.0; chunk.len() * per_gene])?;
        let n_chains = chunk.len() * n_folds * n_eps;
        let mut counts_t = Tensor::<i32>::zeros(be, &[2 * n_chains])?;
        let chains_per_fold = chunk.len() * n_eps;
        let blocks = u32::try_from(chains_per_fold.div_ceil(WARPS_PER_BLOCK))
            .map_err(|_| Error::invalid(format!("{OP}: too many genes × ε for one launch")))?;
        let cfg = LaunchCfg {
            grid: (blocks, n_folds as u32, 1),
            block: ((32 * WARPS_PER_BLOCK) as u32, 1, 1),
            shared_bytes: shared_bytes(lmax),
        };
        let args = [
            gram_t.arg(),
            cross_t.arg(),
            rows_t.arg(),
            fold_l_t.arg(),
            max_iter_t.arg(),
            KernelArg::int("lmax", lmax)?,
            KernelArg::int("nt_max", nt_max)?,
            KernelArg::int("samples", n)?,
            y_t.arg(),
            KernelArg::int("genes", chunk.len())?,
            c_sorted_t.arg(),
            c_index_t.arg(),
            KernelArg::int("C values", n_c)?,
            eps_t.arg(),
            KernelArg::int("epsilon values", n_eps)?,
            // A `double` parameter: the driver and the emulation read the 8
            // bytes of the slot, which hold the value's bits.
            KernelArg::U64(spec.tol.to_bits()),
            scores_t.arg_mut(),
            counts_t.arg_mut(),
        ];
        let kernel = format!("svr_grid_{v}_f64");
        // SAFETY: every buffer was just made on be's device and outlives the
        // launch (to_vec below synchronizes). Fold f (blockIdx.y < n_folds)
        // reads gram[f·lmax² ..][..l²], cross[f·nt_max·lmax ..][..(n−l)·l]
        // and rows[f·n ..][..n] (sample indices < n) with l = fold_l[f] ≤
        // lmax within the variant's limit and n − l ≤ nt_max; warps with a
        // chain < genes·n_eps read y[gene·n ..][..n], C, ε and write
        // scores[chain·n_c ..][..n_c] and counts[2·chain ..][..2] with
        // chain < genes·folds·n_eps, the sizes allocated. Shared memory holds
        // lmax² + 4 warps × 4·lmax doubles, what the kernel indexes. The
        // argument list matches svr_grid_<v>_f64's parameters in order and
        // type.
        unsafe { be.launch(&kernel, cfg, &args)? };
        scores.extend(read_f64(&scores_t)?);
        counts.extend(counts_t.to_vec()?);
    }
    Ok(ChainScores { scores, counts })
}
