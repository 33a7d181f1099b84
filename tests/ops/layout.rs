//! Data movement (kernels/layout.cu: nearest ×2 upsampling and its backward,
//! channel concatenation, `copy_channels_into`, `slice_channels` and
//! `add_channels_into`) against the CPU reference,
//! on the emulated device and on a CUDA GPU when there is one, plus the ops
//! layer's shape errors.
//!
//! Inputs and runners: `super::support`. Tolerance: exact (every forward
//! output is a copy; each upsampling-backward element is the same four-term
//! sum, in the same left-to-right order, as the CPU reference's); channels
//! outside a copied slice must stay untouched.

use cellmorph::{ops, Backend, Tensor};
use proptest::prelude::*;

use super::support::{
    cuda, emulated, exact, expect_shape_error, numel, ok, on_devices, pair, run, zeros, Rng,
};

fn upsample_matches_cpu(be: &Backend) {
    let case = (
        1usize..=3,
        1usize..=3,
        1usize..=16,
        1usize..=16,
        any::<u64>(),
    );
    run(be, case, |be, (n, c, h, w, seed)| {
        let shape = [n, c, h, w];
        let data = Rng(seed).vec(numel(&shape), -4.0, 4.0);
        let (xc, xd) = pair(be, &shape, &data)?;
        let reference = ok(ok(ops::upsample_nearest2x(&Backend::cpu(), &xc))?.to_vec())?;
        let out = ok(ops::upsample_nearest2x(be, &xd))?;
        prop_assert_eq!(out.shape(), &[n, c, 2 * h, 2 * w]);
        exact(
            &format!("upsample_nearest2x {shape:?} seed {seed}"),
            &reference,
            &ok(out.to_vec())?,
        )
    });
}

/// The gather backward of upsampling, bit-exact against the CPU reference,
/// through both forms (the `_into` form into a prefilled `dx`).
fn upsample_backward_matches_cpu(be: &Backend) {
    let case = (
        1usize..=3,
        1usize..=3,
        1usize..=16,
        1usize..=16,
        any::<u64>(),
    );
    run(be, case, |be, (n, c, h, w, seed)| {
        let ctx = format!("upsample_nearest2x_backward [{n}, {c}, {h}, {w}] seed {seed}");
        let shape = [n, c, 2 * h, 2 * w];
        let data = Rng(seed).vec(numel(&shape), -4.0, 4.0);
        let (dyc, dyd) = pair(be, &shape, &data)?;
        let reference = ok(ok(ops::upsample_nearest2x_backward(&Backend::cpu(), &dyc))?.to_vec())?;
        let out = ok(ops::upsample_nearest2x_backward(be, &dyd))?;
        prop_assert_eq!(out.shape(), &[n, c, h, w]);
        exact(&ctx, &reference, &ok(out.to_vec())?)?;
        let mut dx = ok(Tensor::from_slice(
            be,
            &[n, c, h, w],
            &vec![7.0; n * c * h * w],
        ))?;
        ok(ops::upsample_nearest2x_backward_into(be, &dyd, &mut dx))?;
        exact(&format!("{ctx} (into)"), &reference, &ok(dx.to_vec())?)
    });
}

/// Concatenation of 1–3 inputs, and a copy into a channel slice of a
/// prefilled destination that must leave the other channels untouched.
fn concat_matches_cpu(be: &Backend) {
    let case = (
        1usize..=2,
        prop::collection::vec(1usize..=4, 1..=3),
        prop::collection::vec(1usize..=8, 0..=2),
        any::<u64>(),
    );
    run(be, case, |be, (n, channels, spatial, seed)| {
        let ctx = format!("concat n {n} channels {channels:?} spatial {spatial:?} seed {seed}");
        let mut rng = Rng(seed);
        let shape_of = |c: usize| [vec![n, c], spatial.clone()].concat();
        let mut inputs = Vec::new();
        for &c in &channels {
            let shape = shape_of(c);
            inputs.push(pair(be, &shape, &rng.vec(numel(&shape), -4.0, 4.0))?);
        }
        let cpu_refs: Vec<&Tensor> = inputs.iter().map(|p| &p.0).collect();
        let dev_refs: Vec<&Tensor> = inputs.iter().map(|p| &p.1).collect();
        let reference = ok(ops::concat_channels(&Backend::cpu(), &cpu_refs))?;
        let out = ok(ops::concat_channels(be, &dev_refs))?;
        prop_assert_eq!(out.shape(), reference.shape());
        exact(&ctx, &ok(reference.to_vec())?, &ok(out.to_vec())?)?;

        // The last input into a destination with two spare channels on each side.
        let last = inputs.len() - 1;
        let dst_shape = shape_of(channels[last] + 4);
        let fill = rng.vec(numel(&dst_shape), 10.0, 20.0);
        let (mut dc, mut dd) = pair(be, &dst_shape, &fill)?;
        ok(ops::copy_channels_into(
            &Backend::cpu(),
            &inputs[last].0,
            &mut dc,
            2,
        ))?;
        ok(ops::copy_channels_into(be, &inputs[last].1, &mut dd, 2))?;
        let reference = ok(dc.to_vec())?;
        let hw: usize = spatial.iter().product();
        let block = (channels[last] + 4) * hw;
        for (i, (&r, &f)) in reference.iter().zip(&fill).enumerate() {
            let ch = (i % block) / hw;
            if !(2..2 + channels[last]).contains(&ch) {
                prop_assert_eq!(r, f, "{}: CPU copy_channels touched channel {}", ctx, ch);
            }
        }
        exact(
            &format!("{ctx} (copy_channels_into)"),
            &reference,
            &ok(dd.to_vec())?,
        )
    });
}

/// A channel slice of a random source, through both forms (the `_into`
/// form into a prefilled destination, which it must overwrite).
fn slice_matches_cpu(be: &Backend) {
    let case = (
        1usize..=3,
        1usize..=6,
        prop::collection::vec(1usize..=8, 0..=2),
        any::<u64>(),
    );
    run(be, case, |be, (n, c_src, spatial, seed)| {
        let mut rng = Rng(seed);
        let offset = (rng.next_u64() % c_src as u64) as usize;
        let count = 1 + (rng.next_u64() % (c_src - offset) as u64) as usize;
        let ctx = format!(
            "slice_channels n {n} c {c_src} spatial {spatial:?} {offset}+{count} seed {seed}"
        );
        let shape = [vec![n, c_src], spatial.clone()].concat();
        let (sc, sd) = pair(be, &shape, &rng.vec(numel(&shape), -4.0, 4.0))?;
        let reference = ok(ops::slice_channels(&Backend::cpu(), &sc, offset, count))?;
        let out = ok(ops::slice_channels(be, &sd, offset, count))?;
        prop_assert_eq!(out.shape(), reference.shape());
        let reference = ok(reference.to_vec())?;
        // The CPU reference against a direct index of the source.
        let hw: usize = spatial.iter().product();
        let src = ok(sc.to_vec())?;
        for (i, &r) in reference.iter().enumerate() {
            let (b, rest) = (i / (count * hw), i % (count * hw));
            prop_assert_eq!(r, src[b * c_src * hw + offset * hw + rest], "{}", ctx);
        }
        exact(&ctx, &reference, &ok(out.to_vec())?)?;
        let dst_shape = [vec![n, count], spatial.clone()].concat();
        let mut dd = ok(Tensor::from_slice(
            be,
            &dst_shape,
            &vec![7.0; numel(&dst_shape)],
        ))?;
        ok(ops::slice_channels_into(be, &sd, offset, &mut dd))?;
        exact(&format!("{ctx} (into)"), &reference, &ok(dd.to_vec())?)
    });
}

/// `add_channels_into`: one f32 add per element into a channel range of a
/// prefilled tensor (the other channels untouched), bit-exact against the
/// CPU reference, which is checked against a direct index.
fn add_channels_matches_cpu(be: &Backend) {
    let case = (
        1usize..=3,
        1usize..=6,
        0usize..=3,
        prop::collection::vec(1usize..=7, 0..=2),
        any::<u64>(),
    );
    run(be, case, |be, (n, c, spare, spatial, seed)| {
        let ctx = format!("add_channels n {n} c {c} spare {spare} spatial {spatial:?} seed {seed}");
        let mut rng = Rng(seed);
        let offset = spare / 2;
        let wide = [vec![n, c + spare], spatial.clone()].concat();
        let narrow = [vec![n, c], spatial.clone()].concat();
        let (mut dc, mut dd) = pair(be, &wide, &rng.vec(numel(&wide), -4.0, 4.0))?;
        let (sc, sd) = pair(be, &narrow, &rng.vec(numel(&narrow), -4.0, 4.0))?;
        let before = ok(dc.to_vec())?;
        ok(ops::add_channels_into(
            &Backend::cpu(),
            &sc,
            &mut dc,
            offset,
        ))?;
        ok(ops::add_channels_into(be, &sd, &mut dd, offset))?;
        let reference = ok(dc.to_vec())?;
        let hw: usize = spatial.iter().product();
        let src = ok(sc.to_vec())?;
        for (i, (&r, &b)) in reference.iter().zip(&before).enumerate() {
            let (img, ch, p) = (i / ((c + spare) * hw), (i / hw) % (c + spare), i % hw);
            let want = if (offset..offset + c).contains(&ch) {
                b + src[(img * c + ch - offset) * hw + p]
            } else {
                b
            };
            prop_assert_eq!(r.to_bits(), want.to_bits(), "{}: CPU at {}", ctx, i);
        }
        exact(&ctx, &reference, &ok(dd.to_vec())?)
    });
}

on_devices!(
    upsample_matches_cpu,
    upsample_backward_matches_cpu,
    concat_matches_cpu,
    slice_matches_cpu,
    add_channels_matches_cpu
);

#[test]
fn shape_errors() {
    let be = emulated();
    let x = zeros(&be, &[1, 2, 5, 5]);
    expect_shape_error(
        ops::upsample_nearest2x_into(&be, &x, &mut zeros(&be, &[1, 2, 10, 9])),
        "upsample_nearest2x",
        &["[1, 2, 10, 9]", "[1, 2, 10, 10]"],
    );
    expect_shape_error(
        ops::upsample_nearest2x_backward(&be, &x),
        "upsample_nearest2x_backward",
        &["[1, 2, 5, 5]", "even"],
    );
    expect_shape_error(
        ops::upsample_nearest2x_backward_into(
            &be,
            &zeros(&be, &[1, 2, 4, 6]),
            &mut zeros(&be, &[1, 2, 2, 2]),
        ),
        "upsample_nearest2x_backward",
        &["dx", "[1, 2, 2, 2]", "[1, 2, 2, 3]"],
    );

    expect_shape_error(
        ops::concat_channels(&be, &[]),
        "concat_channels",
        &["no tensors"],
    );
    expect_shape_error(
        ops::concat_channels(&be, &[&x, &zeros(&be, &[1, 3, 5, 4])]),
        "concat_channels",
        &["[1, 3, 5, 4]", "[1, 2, 5, 5]"],
    );
    let mut dst = zeros(&be, &[1, 3, 5, 5]);
    expect_shape_error(
        ops::copy_channels_into(&be, &x, &mut dst, 2),
        "copy_channels",
        &["offset 2", "[1, 2, 5, 5]", "[1, 3, 5, 5]"],
    );
    expect_shape_error(
        ops::copy_channels_into(&be, &zeros(&be, &[2, 2, 5, 5]), &mut dst, 0),
        "copy_channels",
        &["[2, 2, 5, 5]", "[1, 3, 5, 5]"],
    );
    expect_shape_error(
        ops::slice_channels(&be, &x, 1, 2),
        "slice_channels",
        &["1..1+2", "[1, 2, 5, 5]"],
    );
    expect_shape_error(
        ops::slice_channels_into(&be, &dst, 0, &mut zeros(&be, &[1, 2, 5, 4])),
        "slice_channels",
        &["[1, 3, 5, 5]", "[1, 2, 5, 4]"],
    );
    expect_shape_error(
        ops::add_channels_into(&be, &x, &mut zeros(&be, &[1, 3, 5, 4]), 0),
        "add_channels",
        &["[1, 2, 5, 5]", "[1, 3, 5, 4]"],
    );
    expect_shape_error(
        ops::add_channels_into(&be, &x, &mut zeros(&be, &[1, 3, 5, 5]), 2),
        "add_channels",
        &["offset 2", "[1, 3, 5, 5]"],
    );
}
