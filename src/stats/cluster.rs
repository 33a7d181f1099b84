//! Agglomerative Ward clustering as SciPy computes it:
//! `scipy.cluster.hierarchy.linkage(X, "ward")` (Euclidean distances, the
//! nearest-neighbour-chain algorithm with the Lance–Williams update for
//! Ward, merges sorted stably by height, clusters renumbered n, n+1, … in
//! merge order), `fcluster(Z, k, "maxclust")` and `dendrogram(Z)["leaves"]`.
//!
//! Ties: the chain algorithm here makes the same choices as SciPy's
//! (first minimum in index order, the chain's previous element preferred),
//! so equal distances merge as SciPy merges them (tested on integer grid
//! points full of duplicates); distances that differ by rounding only
//! (SciPy's `pdist` may sum in another order) could still resolve
//! differently.
//!
//! Memory is the condensed distance matrix, 4·n² bytes: inputs above
//! [`MAX_ITEMS`] are refused.

use crate::stats::tsne::condensed_index;
use crate::{Error, Result};

/// Most items [`ward_linkage`] accepts (400 MB of distances).
pub const MAX_ITEMS: usize = 10_000;

/// One row of a SciPy linkage matrix.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Merge {
    /// The smaller cluster id (items are 0..n, merged clusters n + row).
    pub a: usize,
    /// The larger cluster id.
    pub b: usize,
    /// Ward distance between the two clusters.
    pub height: f64,
    /// Items in the merged cluster.
    pub size: usize,
}

/// A hierarchy over n items: n − 1 merges in order of height.
#[derive(Debug, Clone, PartialEq)]
pub struct Linkage {
    /// Number of items (leaves).
    pub n: usize,
    /// The merges; merge `i` creates cluster `n + i`.
    pub merges: Vec<Merge>,
}

/// Ward linkage of the rows of `x` (n × d, row-major).
///
/// # Errors
/// Fewer than 2 or more than [`MAX_ITEMS`] rows, a length that does not
/// fit, or a non-finite value.
pub fn ward_linkage(x: &[f64], n: usize, d: usize) -> Result<Linkage> {
    if n < 2 {
        return Err(Error::invalid(format!(
            "Ward clustering needs at least 2 items, got {n}"
        )));
    }
    if n > MAX_ITEMS {
        return Err(Error::invalid(format!(
            "Ward clustering keeps all n² distances: {n} items is above the limit of {MAX_ITEMS}"
        )));
    }
    if d == 0 || x.len() != n * d {
        return Err(Error::invalid(format!(
            "Ward clustering: {} values for {n} items × {d} features",
            x.len()
        )));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(format!(
            "Ward clustering: value of item {}, feature {} is not finite ({})",
            i / d,
            i % d,
            x[i]
        )));
    }
    let mut dist = Vec::with_capacity(n * (n - 1) / 2);
    for i in 0..n {
        let xi = &x[i * d..(i + 1) * d];
        for j in i + 1..n {
            let xj = &x[j * d..(j + 1) * d];
            let s: f64 = xi.iter().zip(xj).map(|(a, b)| (a - b) * (a - b)).sum();
            dist.push(s.sqrt());
        }
    }
    Ok(nn_chain_ward(dist, n))
}

/// Lance–Williams update of the Ward distance from cluster i to the merge
/// of x and y.
fn ward_update(d_xi: f64, d_yi: f64, d_xy: f64, nx: usize, ny: usize, ni: usize) -> f64 {
    let t = 1.0 / (nx + ny + ni) as f64;
    ((ni + nx) as f64 * t * d_xi * d_xi + (ni + ny) as f64 * t * d_yi * d_yi
        - ni as f64 * t * d_xy * d_xy)
        .sqrt()
}

/// The nearest-neighbour chain on condensed distances `dist`, then the
/// stable sort by height and the renumbering of clusters in merge order.
fn nn_chain_ward(mut dist: Vec<f64>, n: usize) -> Linkage {
    // Slot-based merges: cluster slots are item indices; a merge keeps the
    // larger slot and empties the smaller.
    let mut size = vec![1usize; n];
    let mut chain: Vec<usize> = Vec::with_capacity(n);
    let mut raw: Vec<(usize, usize, f64)> = Vec::with_capacity(n - 1);
    for _ in 0..n - 1 {
        let mut x = match chain.last() {
            Some(&x) => x,
            None => {
                // At least two slots are live while merges remain.
                let first = size.iter().position(|&s| s > 0).unwrap_or(0);
                chain.push(first);
                first
            }
        };
        let (y, d_xy) = loop {
            let previous = (chain.len() > 1).then(|| chain[chain.len() - 2]);
            let (mut y, mut best) = match previous {
                Some(p) => (p, dist[condensed_index(n, x, p)]),
                None => (x, f64::INFINITY),
            };
            for (i, &si) in size.iter().enumerate() {
                if si == 0 || i == x {
                    continue;
                }
                let d = dist[condensed_index(n, x, i)];
                if d < best {
                    best = d;
                    y = i;
                }
            }
            if previous == Some(y) {
                break (y, best);
            }
            chain.push(y);
            x = y;
        };
        chain.truncate(chain.len() - 2);
        let (x, y) = if x < y { (x, y) } else { (y, x) };
        let (nx, ny) = (size[x], size[y]);
        raw.push((x, y, d_xy));
        size[x] = 0;
        size[y] = nx + ny;
        for (i, &ni) in size.iter().enumerate() {
            if ni == 0 || i == y {
                continue;
            }
            let (ix, iy) = (condensed_index(n, i, x), condensed_index(n, i, y));
            dist[iy] = ward_update(dist[ix], dist[iy], d_xy, nx, ny, ni);
        }
    }
    // Stable by height, as NumPy's mergesort.
    raw.sort_by(|a, b| a.2.total_cmp(&b.2));
    // Renumber: union-find over slots, new clusters n, n+1, … in order.
    let mut parent: Vec<usize> = (0..2 * n - 1).collect();
    let mut csize = vec![1usize; 2 * n - 1];
    let find = |parent: &mut Vec<usize>, mut v: usize| {
        let mut root = v;
        while parent[root] != root {
            root = parent[root];
        }
        while parent[v] != root {
            let next = parent[v];
            parent[v] = root;
            v = next;
        }
        root
    };
    let merges = raw
        .iter()
        .enumerate()
        .map(|(k, &(x, y, h))| {
            let (rx, ry) = (find(&mut parent, x), find(&mut parent, y));
            let new = n + k;
            parent[rx] = new;
            parent[ry] = new;
            csize[new] = csize[rx] + csize[ry];
            Merge {
                a: rx.min(ry),
                b: rx.max(ry),
                height: h,
                size: csize[new],
            }
        })
        .collect();
    Linkage { n, merges }
}

impl Linkage {
    /// Children of cluster `node` (≥ n).
    fn children(&self, node: usize) -> (usize, usize) {
        let m = &self.merges[node - self.n];
        (m.a, m.b)
    }

    /// Leaves in dendrogram order (SciPy's `dendrogram(Z)["leaves"]`: the
    /// first child's leaves before the second's).
    pub fn leaves(&self) -> Vec<usize> {
        let n = self.n;
        if self.merges.is_empty() {
            return (0..n).collect();
        }
        let mut out = Vec::with_capacity(n);
        let mut stack = vec![2 * n - 2];
        while let Some(v) = stack.pop() {
            if v < n {
                out.push(v);
            } else {
                let (a, b) = self.children(v);
                stack.push(b);
                stack.push(a);
            }
        }
        out
    }

    /// Flat clusters numbered from 1, at most `k` of them (exactly `k`
    /// unless heights tie), as SciPy's `fcluster(Z, k, "maxclust")`:
    /// the lowest merge height whose cut leaves at most `k` clusters, then
    /// SciPy's numbering (a depth-first walk from the root).
    ///
    /// # Errors
    /// `k` is 0.
    pub fn fcluster_maxclust(&self, k: usize) -> Result<Vec<usize>> {
        let n = self.n;
        if k == 0 {
            return Err(Error::invalid("the number of clusters must be at least 1"));
        }
        if k >= n || self.merges.is_empty() {
            return Ok((1..=n).collect());
        }
        // Largest merge height within each cluster (SciPy's max_dists).
        let mut max_dist = vec![0f64; n - 1];
        for (i, m) in self.merges.iter().enumerate() {
            let mut h = m.height;
            for c in [m.a, m.b] {
                if c >= n {
                    h = h.max(max_dist[c - n]);
                }
            }
            max_dist[i] = h;
        }
        let count = |t: f64| {
            let mut clusters = 0usize;
            let mut stack = vec![2 * n - 2];
            while let Some(v) = stack.pop() {
                if v < n || max_dist[v - n] <= t {
                    clusters += 1;
                } else {
                    let (a, b) = self.children(v);
                    stack.push(a);
                    stack.push(b);
                }
            }
            clusters
        };
        // count(max_dist[i]) does not increase with i (heights are sorted).
        let (mut lo, mut hi) = (0usize, n - 2);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if count(max_dist[mid]) <= k {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Ok(self.number_clusters(&max_dist, max_dist[lo]))
    }

    /// SciPy's `cluster_monocrit` numbering at `cutoff`: walk from the root,
    /// first child first; a cluster is numbered when its root is reached,
    /// a singleton leaf when both subtrees of its parent are done.
    fn number_clusters(&self, max_dist: &[f64], cutoff: f64) -> Vec<usize> {
        let n = self.n;
        let mut labels = vec![0usize; n];
        let mut count = 0usize;
        let mut leader: Option<usize> = None;
        // (node, stage): stage 0 = entering, 1 = first child done, 2 = both done.
        let mut stack = vec![(2 * n - 2, 0u8)];
        while let Some((v, stage)) = stack.pop() {
            let (a, b) = self.children(v);
            if stage == 0 {
                if leader.is_none() && max_dist[v - n] <= cutoff {
                    leader = Some(v);
                    count += 1;
                }
                stack.push((v, 1));
                if a >= n {
                    stack.push((a, 0));
                }
                continue;
            }
            if stage == 1 {
                stack.push((v, 2));
                if b >= n {
                    stack.push((b, 0));
                }
                continue;
            }
            for c in [a, b] {
                if c < n {
                    if leader.is_none() {
                        count += 1;
                    }
                    labels[c] = count;
                }
            }
            if leader == Some(v) {
                leader = None;
            }
        }
        labels
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_points_on_a_line() {
        // 0, 1 close; 10, 12 close. Ward distance of two singletons is their
        // Euclidean distance; of the two pairs sqrt(2·2·2/4)·|mean gap| =
        // sqrt(2)·10.5.
        let x = [0.0, 1.0, 10.0, 12.0];
        let z = ward_linkage(&x, 4, 1).unwrap();
        assert_eq!((z.merges[0].a, z.merges[0].b, z.merges[0].size), (0, 1, 2));
        assert_eq!((z.merges[1].a, z.merges[1].b, z.merges[1].size), (2, 3, 2));
        assert_eq!((z.merges[2].a, z.merges[2].b, z.merges[2].size), (4, 5, 4));
        assert!((z.merges[0].height - 1.0).abs() < 1e-12);
        assert!((z.merges[1].height - 2.0).abs() < 1e-12);
        assert!((z.merges[2].height - 2f64.sqrt() * 10.5).abs() < 1e-12);
        assert_eq!(z.leaves(), vec![0, 1, 2, 3]);
        assert_eq!(z.fcluster_maxclust(2).unwrap(), vec![1, 1, 2, 2]);
        assert_eq!(z.fcluster_maxclust(1).unwrap(), vec![1; 4]);
        assert_eq!(z.fcluster_maxclust(9).unwrap(), vec![1, 2, 3, 4]);
        assert!(z.fcluster_maxclust(0).is_err());
        assert!(ward_linkage(&[1.0], 1, 1).is_err());
        assert!(ward_linkage(&[1.0, f64::NAN], 2, 1).is_err());
    }
}
