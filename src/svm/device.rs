//! The RBF SVC on a kernel device (CUDA, or emulated): `kernels/svm.cu`,
//! one warp per two-class dual.
//!
//! [`solve_duals_on`] solves independent duals like [`smo::solve`],
//! [`fit_on`] is [`Svc::fit`] and [`grid_search_on`] is
//! [`super::grid_search`]. On [`Device::Cpu`] each calls the CPU solver.
//!
//! Design:
//! - The Gram matrices (RBF values of a pair's samples) are computed on the
//!   host in `f64` exactly as the CPU path computes them, from the same
//!   squared distances; the device only runs SMO. Prediction (the held-out
//!   decision functions of the grid, `svm predict`) stays on the CPU: it is
//!   one pass over the support vectors per sample, cheap next to the solves.
//! - A grid search gathers the one-vs-one problems of every fold and every
//!   (C, γ) setting: the problems of one pair under one γ on one fold share
//!   a Gram matrix (they differ only in C), and a block's 4 warps solve
//!   problems on the same matrix. All of them go in one launch per kernel
//!   variant (more when their Gram matrices exceed [`MAX_GRAM_PER_LAUNCH`]
//!   values), then the refit of the best setting in one more.
//! - Problems of at most [`SHARED_MAX_ROWS`] samples run with the Gram
//!   matrix in shared memory (`svm_batch_shared_f64`); larger ones read it
//!   from global memory (`svm_batch_global_f64`), so every size the CPU
//!   path takes also runs on the device.
//! - The kernels repeat every floating-point operation of [`smo::solve`] in
//!   the same order, so coefficients, intercepts and iteration counts, and
//!   so the grid's accuracies, choice and model, equal the CPU's exactly (up
//!   to the sign of a zero intercept).
//!
//! [`crate::Tensor`] has no `f64` element type, so `f64` buffers travel as
//! their bit patterns in `Tensor<i64>` (`backend::buffers`).

use std::collections::HashMap;

use rayon::prelude::*;

use super::grid::{search, FitJob, MAX_GRID_SAMPLES};
use super::smo::{self, SmoOutcome};
use super::{
    check_params, check_training_rows, FitPlan, PairSolution, Svc, SvmGridOutcome, SvmGridSpec,
};
use crate::backend::buffers::{f64_buffer, i64_buffer, int_buffer, read_f64, WarpBlocks};
use crate::backend::{Backend, LaunchCfg};
use crate::device::Device;
use crate::svr::cv::Folds;
use crate::tensor::Tensor;
use crate::{Error, Result};

/// What an argument that does not fit a kernel `int` is reported against.
const INT_OP: &str = "svm device solver";

/// Most samples a dual solved with its Gram matrix in shared memory may
/// have; larger ones use the global-memory kernel.
pub const SHARED_MAX_ROWS: usize = 128;

/// Most samples one dual may have on a kernel device (the grid search's
/// bound on samples).
pub const DEVICE_MAX_ROWS: usize = MAX_GRID_SAMPLES;

/// Most Gram-matrix values (`f64`) one launch uploads (256 MiB); a single
/// larger matrix goes alone.
pub const MAX_GRAM_PER_LAUNCH: usize = 1 << 25;

/// Warps (problems) per block, `kSvmWarps` in the kernel.
const WARPS_PER_BLOCK: usize = 4;

/// One two-class C-SVC dual over a precomputed Gram matrix, labels in
/// libsvm's pair order: the first `n_pos` samples +1, the rest −1.
#[derive(Debug, Clone, Copy)]
pub struct SvcDual<'a> {
    /// `l × l` row-major kernel matrix.
    pub gram: &'a [f64],
    /// Samples.
    pub l: usize,
    /// Samples labelled +1 (the first ones).
    pub n_pos: usize,
    /// Box constraint.
    pub c: f64,
    /// Stopping tolerance.
    pub tol: f64,
}

impl SvcDual<'_> {
    /// The CPU reference: [`smo::solve`] with labels `+1` for the first
    /// `n_pos` samples and `−1` for the rest and its default iteration cap.
    /// The dual must be valid (as [`solve_duals_on`] checks).
    pub fn solve_cpu(&self) -> PairSolution {
        let labels: Vec<f64> = (0..self.l)
            .map(|t| if t < self.n_pos { 1.0 } else { -1.0 })
            .collect();
        let mut coef = vec![0.0; self.l];
        let outcome = smo::solve(
            self.gram,
            self.l,
            &labels,
            self.c,
            self.tol,
            smo::default_max_iter(self.l),
            &mut coef,
        );
        PairSolution { coef, outcome }
    }
}

/// Solves every dual on `be`'s device: the same results as [`smo::solve`]
/// with labels `+1` for the first `n_pos` samples and `−1` for the rest and
/// its default iteration cap. Duals given the same `gram` slice share one
/// copy of it on the device.
///
/// # Errors
/// A Gram matrix that is not `l × l`, `n_pos > l`, `l = 0`, `l` above
/// [`DEVICE_MAX_ROWS`] on a kernel device, C or tol not finite and > 0, or
/// a launch failure.
pub fn solve_duals_on(be: &Backend, duals: &[SvcDual]) -> Result<Vec<PairSolution>> {
    const OP: &str = "svm::solve_duals_on";
    for (k, d) in duals.iter().enumerate() {
        if d.l == 0 || d.gram.len() != d.l * d.l || d.n_pos > d.l {
            return Err(Error::shape(
                OP,
                format!(
                    "dual {k}: {} Gram values, l = {}, {} positive samples",
                    d.gram.len(),
                    d.l,
                    d.n_pos
                ),
            ));
        }
        if be.device() != Device::Cpu && d.l > DEVICE_MAX_ROWS {
            return Err(Error::shape(
                OP,
                format!(
                    "dual {k}: {} samples, the device solver takes at most {DEVICE_MAX_ROWS}",
                    d.l
                ),
            ));
        }
        check_params(d.c, 1.0, d.tol).map_err(|e| Error::invalid(format!("dual {k}: {e}")))?;
    }
    if be.device() == Device::Cpu {
        return Ok(duals.par_iter().map(SvcDual::solve_cpu).collect());
    }
    // Gram sets by slice identity, in first-use order.
    let mut set_of: HashMap<(usize, usize), usize> = HashMap::new();
    let mut set_dual: Vec<usize> = Vec::new();
    let set_index: Vec<usize> = duals
        .iter()
        .enumerate()
        .map(|(k, d)| {
            let next = set_dual.len();
            let s = *set_of
                .entry((d.gram.as_ptr() as usize, d.gram.len()))
                .or_insert(next);
            if s == next {
                set_dual.push(k);
            }
            s
        })
        .collect();
    let mut out: Vec<Option<PairSolution>> = vec![None; duals.len()];
    // Launches: by kernel variant, then sets in order until the Gram values
    // exceed MAX_GRAM_PER_LAUNCH.
    for shared in [true, false] {
        let mut chunk: Vec<usize> = Vec::new();
        let mut values = 0usize;
        let sets: Vec<usize> = (0..set_dual.len())
            .filter(|&s| (duals[set_dual[s]].l <= SHARED_MAX_ROWS) == shared)
            .collect();
        let in_chunk = |chunk: &[usize]| -> Vec<usize> {
            (0..duals.len())
                .filter(|&k| chunk.binary_search(&set_index[k]).is_ok())
                .collect()
        };
        for s in sets {
            let size = duals[set_dual[s]].gram.len();
            if !chunk.is_empty() && values + size > MAX_GRAM_PER_LAUNCH {
                launch(be, shared, duals, &set_index, &in_chunk(&chunk), &mut out)?;
                chunk.clear();
                values = 0;
            }
            chunk.push(s);
            values += size;
        }
        if !chunk.is_empty() {
            launch(be, shared, duals, &set_index, &in_chunk(&chunk), &mut out)?;
        }
    }
    out.into_iter()
        .map(|s| s.ok_or_else(|| Error::invalid(format!("{OP}: a dual was not solved"))))
        .collect()
}

/// [`Svc::fit`] on `be`'s device, with the same result.
///
/// # Errors
/// As [`Svc::fit`], and a pair above [`DEVICE_MAX_ROWS`] samples on a
/// kernel device or a launch failure.
#[allow(clippy::too_many_arguments)]
pub fn fit_on(
    be: &Backend,
    x: &[f64],
    n_features: usize,
    rows: &[usize],
    y: &[usize],
    c: f64,
    gamma: f64,
    tol: f64,
) -> Result<Svc> {
    if be.device() == Device::Cpu {
        return Svc::fit(x, n_features, rows, y, c, gamma, tol);
    }
    check_training_rows("svm::fit_on", x, n_features, rows)?;
    let row = |r: usize| &x[r * n_features..(r + 1) * n_features];
    let dist = |a: usize, b: usize| super::squared_distance(row(a), row(b));
    let job = FitJob {
        rows,
        labels: y.to_vec(),
        c,
        gamma,
        what: None,
    };
    fit_jobs(be, x, n_features, tol, std::slice::from_ref(&job), &dist)?
        .pop()
        .ok_or_else(|| Error::invalid("svm::fit_on: no model"))
}

/// [`super::grid_search`] on `be`'s device, with the same results: every
/// pairwise dual of every (setting, fold) in one batch, then the refit.
///
/// # Errors
/// As [`super::grid_search`], and launch failures.
pub fn grid_search_on(
    be: &Backend,
    x: &[f64],
    n_features: usize,
    y: &[usize],
    spec: &SvmGridSpec,
    folds: &Folds,
) -> Result<SvmGridOutcome> {
    if be.device() == Device::Cpu {
        return super::grid_search(x, n_features, y, spec, folds);
    }
    search(x, n_features, y, spec, folds, &|jobs, dist| {
        fit_jobs(be, x, n_features, spec.tol, jobs, dist)
    })
}

/// Fits every job on `be` (a kernel device): plans the pairs of each
/// distinct (training rows, γ), computes each pair's Gram matrix once for
/// all the C values that use it, solves every dual in batches and assembles
/// the models as [`Svc::fit`] does.
fn fit_jobs(
    be: &Backend,
    x: &[f64],
    n_features: usize,
    tol: f64,
    jobs: &[FitJob],
    dist: &(dyn Fn(usize, usize) -> f64 + Sync),
) -> Result<Vec<Svc>> {
    // Plans by (training rows, γ bits).
    let mut plan_of: HashMap<(&[usize], u64), usize> = HashMap::new();
    let mut plans: Vec<(FitPlan, &[usize], f64)> = Vec::new();
    let mut job_plan = Vec::with_capacity(jobs.len());
    for job in jobs {
        check_params(job.c, job.gamma, tol).map_err(|e| job.context(e))?;
        let next = plans.len();
        let k = *plan_of
            .entry((job.rows, job.gamma.to_bits()))
            .or_insert(next);
        if k == next {
            let plan = FitPlan::new(job.rows, &job.labels).map_err(|e| job.context(e))?;
            plans.push((plan, job.rows, job.gamma));
        }
        job_plan.push(k);
    }
    // Gram sets: (plan, pair); the duals of each set: (job, pair).
    let sets: Vec<(usize, usize)> = plans
        .iter()
        .enumerate()
        .flat_map(|(k, (plan, _, _))| (0..plan.pairs.len()).map(move |p| (k, p)))
        .collect();
    let mut set_start = Vec::with_capacity(plans.len());
    let mut acc = 0;
    for (plan, _, _) in &plans {
        set_start.push(acc);
        acc += plan.pairs.len();
    }
    let mut set_jobs: Vec<Vec<usize>> = vec![Vec::new(); sets.len()];
    for (j, &k) in job_plan.iter().enumerate() {
        for p in 0..plans[k].0.pairs.len() {
            set_jobs[set_start[k] + p].push(j);
        }
    }
    let l_of = |s: usize| {
        let (k, p) = sets[s];
        plans[k].0.pairs[p].pos.len()
    };
    for s in 0..sets.len() {
        if l_of(s) > DEVICE_MAX_ROWS {
            return Err(Error::invalid(format!(
                "SVC on {}: a pair of {} samples, the device solver takes at most \
                 {DEVICE_MAX_ROWS} (use the CPU device)",
                be.device(),
                l_of(s)
            )));
        }
    }
    let mut solutions: Vec<Vec<Option<PairSolution>>> = jobs
        .iter()
        .zip(&job_plan)
        .map(|(_, &k)| vec![None; plans[k].0.pairs.len()])
        .collect();
    // Chunks of sets whose Gram matrices fit MAX_GRAM_PER_LAUNCH.
    let mut s0 = 0;
    while s0 < sets.len() {
        let mut s1 = s0 + 1;
        let mut values = l_of(s0) * l_of(s0);
        while s1 < sets.len() && values + l_of(s1) * l_of(s1) <= MAX_GRAM_PER_LAUNCH {
            values += l_of(s1) * l_of(s1);
            s1 += 1;
        }
        let grams: Vec<Vec<f64>> = (s0..s1)
            .into_par_iter()
            .map(|s| {
                let (k, p) = sets[s];
                let (plan, rows, gamma) = &plans[k];
                plan.gram(p, rows, *gamma, dist)
            })
            .collect();
        let mut duals = Vec::new();
        let mut owners = Vec::new();
        for s in s0..s1 {
            let (k, p) = sets[s];
            let pair = &plans[k].0.pairs[p];
            for &j in &set_jobs[s] {
                duals.push(SvcDual {
                    gram: &grams[s - s0],
                    l: pair.pos.len(),
                    n_pos: pair.n_pos,
                    c: jobs[j].c,
                    tol,
                });
                owners.push((j, p));
            }
        }
        for ((j, p), sol) in owners.into_iter().zip(solve_duals_on(be, &duals)?) {
            solutions[j][p] = Some(sol);
        }
        s0 = s1;
    }
    jobs.iter()
        .zip(&job_plan)
        .zip(solutions)
        .map(|((job, &k), sols)| {
            let sols = sols
                .into_iter()
                .collect::<Option<Vec<PairSolution>>>()
                .ok_or_else(|| Error::invalid("svm device fit: a pair was not solved"))?;
            Ok(Svc::assemble(
                x,
                n_features,
                job.rows,
                &plans[k].0,
                &sols,
                job.gamma,
            ))
        })
        .collect()
}

/// Dynamic shared memory of a `svm_batch_shared_f64` block whose Gram
/// matrices have at most `lmax` rows: the matrix, then 2·lmax doubles (α,
/// G) per warp; at most 136 KiB for [`SHARED_MAX_ROWS`].
fn shared_bytes(lmax: usize) -> u32 {
    ((lmax * lmax + WARPS_PER_BLOCK * 2 * lmax) * std::mem::size_of::<f64>()) as u32
}

/// `duals[members]` (their sets all of one variant) with one
/// `svm_batch_{shared,global}_f64` launch, results into `out`.
fn launch(
    be: &Backend,
    shared: bool,
    duals: &[SvcDual],
    set_index: &[usize],
    members: &[usize],
    out: &mut [Option<PairSolution>],
) -> Result<()> {
    const OP: &str = "svm::solve_duals_on";
    // Problems sorted by Gram set (stable), so that a block's are adjacent.
    let mut order = members.to_vec();
    order.sort_by_key(|&k| set_index[k]);
    let mut local_set: HashMap<usize, usize> = HashMap::new();
    let (mut gram, mut set_off, mut set_l, mut set_n_pos, mut set_max_iter) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut blocks = WarpBlocks::new(WARPS_PER_BLOCK);
    let (mut coef_off, mut c, mut tol) = (Vec::new(), Vec::new(), Vec::new());
    let mut n_coef = 0usize;
    let mut lmax = 1;
    for (p, &k) in order.iter().enumerate() {
        let d = &duals[k];
        let next = set_l.len();
        let s = *local_set.entry(set_index[k]).or_insert(next);
        if s == next {
            set_off.push(gram.len() as i64);
            gram.extend_from_slice(d.gram);
            set_l.push(d.l);
            set_n_pos.push(d.n_pos);
            set_max_iter.push(i64::try_from(smo::default_max_iter(d.l)).unwrap_or(i64::MAX));
            lmax = lmax.max(d.l);
        }
        blocks.push(s, p);
        coef_off.push(n_coef as i64);
        n_coef += d.l;
        c.push(d.c);
        tol.push(d.tol);
    }
    let n_blocks = u32::try_from(blocks.set.len())
        .map_err(|_| Error::invalid(format!("{OP}: too many problems for one launch")))?;
    let ints = |what: &str, v: &[usize]| int_buffer(be, INT_OP, what, v);
    let gram_t = f64_buffer(be, &gram)?;
    let set_off_t = i64_buffer(be, &set_off)?;
    let set_l_t = ints("samples", &set_l)?;
    let set_n_pos_t = ints("positive samples", &set_n_pos)?;
    let set_max_iter_t = i64_buffer(be, &set_max_iter)?;
    let block_set_t = ints("Gram set index", &blocks.set)?;
    let block_first_t = ints("problem index", &blocks.first)?;
    let block_count_t = ints("block size", &blocks.count)?;
    let coef_off_t = i64_buffer(be, &coef_off)?;
    let c_t = f64_buffer(be, &c)?;
    let tol_t = f64_buffer(be, &tol)?;
    let mut work_t = f64_buffer(be, &vec![0.0; if shared { 1 } else { n_coef }])?;
    let mut coef_t = f64_buffer(be, &vec![0.0; n_coef])?;
    let mut rho_t = f64_buffer(be, &vec![0.0; order.len()])?;
    let mut iter_t = i64_buffer(be, &vec![0; order.len()])?;
    let mut conv_t = Tensor::<i32>::zeros(be, &[order.len().max(1)])?;
    let cfg = LaunchCfg {
        grid: (n_blocks, 1, 1),
        block: ((32 * WARPS_PER_BLOCK) as u32, 1, 1),
        shared_bytes: if shared { shared_bytes(lmax) } else { 0 },
    };
    let args = [
        gram_t.arg(),
        set_off_t.arg(),
        set_l_t.arg(),
        set_n_pos_t.arg(),
        set_max_iter_t.arg(),
        block_set_t.arg(),
        block_first_t.arg(),
        block_count_t.arg(),
        coef_off_t.arg(),
        c_t.arg(),
        tol_t.arg(),
        work_t.arg_mut(),
        coef_t.arg_mut(),
        rho_t.arg_mut(),
        iter_t.arg_mut(),
        conv_t.arg_mut(),
    ];
    let kernel = if shared {
        "svm_batch_shared_f64"
    } else {
        "svm_batch_global_f64"
    };
    // SAFETY: every buffer was just made on be's device and outlives the
    // launch (to_vec below synchronizes). Block b reads set block_set[b]
    // (< set count): gram[set_off ..][..l²] with l = set_l ≤ lmax, n_pos ≤ l,
    // and problems block_first[b] + w for w < block_count[b], all < the
    // problem count, whose l coefficients at coef_off lie inside coef (and,
    // for the global variant, work, of the same size); it writes those and
    // rho, iterations, converged at the problem index. For the shared
    // variant every set has l ≤ SHARED_MAX_ROWS and shared memory holds
    // lmax² + 4 warps × 2·lmax doubles, what the kernel indexes. The argument
    // list matches svm_batch_{shared,global}_f64's parameters (const double*
    // gram, const long long* set_off, const int* set_l, const int* set_n_pos,
    // const long long* set_max_iter, const int* block_set, const int*
    // block_first, const int* block_count, const long long* coef_off, const
    // double* c, const double* tol, double* work, double* coef, double* rho,
    // long long* iterations, int* converged) in order and type.
    unsafe { be.launch(kernel, cfg, &args)? };
    let (coef, rho) = (read_f64(&coef_t)?, read_f64(&rho_t)?);
    let (iters, conv) = (iter_t.to_vec()?, conv_t.to_vec()?);
    for (p, &k) in order.iter().enumerate() {
        let off = coef_off[p] as usize;
        out[k] = Some(PairSolution {
            coef: coef[off..off + duals[k].l].to_vec(),
            outcome: SmoOutcome {
                rho: rho[p],
                iterations: iters[p] as usize,
                converged: conv[p] != 0,
            },
        });
    }
    Ok(())
}
