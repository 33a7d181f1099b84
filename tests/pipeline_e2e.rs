//! End to end on a generated data set with known truth: synthetic images and
//! expression → untrained VQ-VAE-2 profiles → SVR grid on batch A →
//! evaluation on the held-out batch B. Signal genes must come out significant
//! and most noise genes must not.

use cellmorph::apps::expression::demo::{run_demo, DemoConfig};
use cellmorph::apps::expression::synth::SynthConfig;
use cellmorph::models::vqvae2::VqVae2Config;
use cellmorph::svr::GridSpec;
use cellmorph::Backend;

fn small_config() -> DemoConfig {
    DemoConfig {
        synth: SynthConfig {
            seed: 3,
            samples: 48,
            images_per_sample: 1,
            width: 320,
            height: 320,
            genes: 40,
            signal_genes: 9,
            ..SynthConfig::default()
        },
        vqvae: VqVae2Config {
            in_channel: 1,
            channel: 32,
            n_res_block: 1,
            n_res_channel: 8,
            embed_dim: 16,
            n_embed: 32,
        },
        grid: GridSpec::parse("1,10,100", "0:0.2:0.1").unwrap(),
        patch: 160,
        batch: 16,
        seed_patches: 24,
        fdr: 0.05,
        progress: false,
    }
}

#[test]
fn signal_genes_are_found_and_noise_genes_are_not() {
    let dir = std::env::temp_dir().join(format!("cellmorph-e2e-{}", std::process::id()));
    let cfg = small_config();
    let t0 = std::time::Instant::now();
    let res = run_demo(&Backend::cpu(), &cfg, &dir).unwrap();
    println!("demo in {:.1} s", t0.elapsed().as_secs_f64());
    print!("{}", res.evaluation.table(12));
    let held_out: Vec<_> = res
        .evaluation
        .results
        .iter()
        .filter(|r| r.dataset.starts_with('B'))
        .collect();
    let signal: Vec<&str> = res
        .truth
        .signal_genes
        .iter()
        .map(|g| g.gene.as_str())
        .collect();
    let (sig_hits, sig_total) = (
        held_out
            .iter()
            .filter(|r| signal.contains(&r.gene.as_str()) && r.significant)
            .count(),
        held_out
            .iter()
            .filter(|r| signal.contains(&r.gene.as_str()))
            .count(),
    );
    let (noise_hits, noise_total) = (
        held_out
            .iter()
            .filter(|r| !signal.contains(&r.gene.as_str()) && r.significant)
            .count(),
        held_out
            .iter()
            .filter(|r| !signal.contains(&r.gene.as_str()))
            .count(),
    );
    println!(
        "held-out: signal {sig_hits}/{sig_total} significant, noise {noise_hits}/{noise_total}"
    );
    assert!(sig_total > 0 && noise_total > 0);
    assert!(
        sig_hits * 2 >= sig_total,
        "only {sig_hits} of {sig_total} signal genes significant"
    );
    assert!(
        noise_hits * 10 <= noise_total,
        "{noise_hits} of {noise_total} noise genes significant"
    );
    let map = res.map.expect("a map of the best gene");
    assert_eq!((map.rows, map.cols), (2, 2));
    assert!(map.values.iter().all(|v| v.is_finite()));
}
