//! The stage graph: edges, cycle reports, topological plans, target selection.
//!
//! An edge `a -> b` exists when `b` names `a` under `inputs`, or when one of
//! `b`'s `deps` is (or lies inside, or contains) one of `a`'s `outs`, the way
//! DVC links stages through files. Execution is in [`crate::run`].

use std::collections::{BTreeSet, HashMap};

use crate::error::{Result, SpecError};
use crate::spec::Pipeline;

#[derive(Debug, Clone)]
pub struct Graph {
    /// `upstream[i]`: indices of the stages stage `i` reads from, sorted.
    pub upstream: Vec<Vec<usize>>,
    /// `downstream[i]`: indices of the stages that read stage `i`, sorted.
    pub downstream: Vec<Vec<usize>>,
    /// A topological order; ties keep the order of the pipeline file.
    pub order: Vec<usize>,
}

fn path_overlaps(a: &str, b: &str) -> bool {
    a == b
        || (a.len() > b.len() && a.starts_with(b) && a.as_bytes()[b.len()] == b'/')
        || (b.len() > a.len() && b.starts_with(a) && b.as_bytes()[a.len()] == b'/')
}

/// The folders above a relative path, nearest first (`a/b/c` -> `a/b`, `a`).
fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    path.char_indices()
        .filter(|(_, c)| *c == '/')
        .map(|(i, _)| &path[..i])
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
}

/// Refuses an out that lies inside another stage's out (`d` and `d/x.txt`):
/// both stages would write the file, each run flipping it. One look-up
/// per folder above each out, so a 10,000-stage chain stays linear.
fn refuse_nested_outs(p: &Pipeline, out_owner: &HashMap<&str, usize>) -> Result<()> {
    for s in &p.stages {
        for o in &s.outs {
            for a in ancestors(o) {
                if let Some(&j) = out_owner.get(a) {
                    let owner = &p.stages[j];
                    let whose = if owner.name == s.name {
                        "another out of this stage".to_string()
                    } else {
                        format!("stage `{}`'s out", owner.name)
                    };
                    let mut e = s.error(
                        &format!("outs.{o}"),
                        format!("out `{o}` lies inside {whose} `{a}`"),
                    );
                    e.hint = Some(
                        "outs may not contain one another: write to separate paths, or list only the folder".into(),
                    );
                    return Err(e.into());
                }
            }
        }
    }
    Ok(())
}

/// Builds the graph and checks it: every input names a stage, no cycles.
pub fn build(p: &Pipeline) -> Result<Graph> {
    let n = p.stages.len();
    let mut upstream: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); n];

    // outs by path for the dep -> out links; exact matches are the common case.
    let mut out_owner: HashMap<&str, usize> = HashMap::new();
    for (i, s) in p.stages.iter().enumerate() {
        for o in &s.outs {
            out_owner.insert(o.as_str(), i);
        }
    }
    let nested_outs = p.stages.iter().any(|s| !s.outs.is_empty());
    refuse_nested_outs(p, &out_owner)?;

    for (i, s) in p.stages.iter().enumerate() {
        for (input, from) in &s.inputs {
            match p.index.get(from.as_str()) {
                Some(&j) if j == i => {
                    return Err(s
                        .error(
                            &format!("inputs.{input}"),
                            "a stage cannot read its own output",
                        )
                        .into());
                }
                Some(&j) => {
                    upstream[i].insert(j);
                }
                None => {
                    let mut e = s.error(
                        &format!("inputs.{input}"),
                        format!("input `{input}` names stage `{from}`, which does not exist"),
                    );
                    e.hint = Some(suggest(from, p));
                    return Err(e.into());
                }
            }
        }
        for d in &s.deps {
            if let Some(o) = ancestors(d).find(|a| s.outs.iter().any(|o| o == a)) {
                return Err(s
                    .error(
                        &format!("deps.{d}"),
                        format!("dep `{d}` lies inside the stage's own out `{o}`"),
                    )
                    .into());
            }
            if let Some(&j) = out_owner.get(d.as_str()) {
                if j == i {
                    return Err(s
                        .error(
                            &format!("deps.{d}"),
                            format!("`{d}` is both a dep and an out"),
                        )
                        .into());
                }
                upstream[i].insert(j);
            } else if nested_outs {
                for (j, other) in p.stages.iter().enumerate() {
                    if j != i && other.outs.iter().any(|o| path_overlaps(o, d)) {
                        upstream[i].insert(j);
                    }
                }
            }
        }
    }

    let upstream: Vec<Vec<usize>> = upstream
        .into_iter()
        .map(|s| s.into_iter().collect())
        .collect();
    let mut downstream = vec![Vec::new(); n];
    for (i, ups) in upstream.iter().enumerate() {
        for &j in ups {
            downstream[j].push(i);
        }
    }
    if let Some(cycle) = find_cycle(&upstream) {
        let names: Vec<&str> = cycle.iter().map(|&i| p.stages[i].name.as_str()).collect();
        let first = &p.stages[cycle[0]];
        return Err(SpecError {
            pos: first.pos.clone(),
            stage: Some(first.name.clone()),
            message: format!("the stages form a cycle: {}", names.join(" -> ")),
            hint: Some("a stage may not depend, directly or not, on its own output".into()),
        }
        .into());
    }
    let order = topo_order(&upstream, &downstream);
    Ok(Graph {
        upstream,
        downstream,
        order,
    })
}

fn suggest(name: &str, p: &Pipeline) -> String {
    did_you_mean(
        name,
        p.stages.iter().map(|s| s.name.as_str()),
        "stages in this file",
    )
}

/// A hint for a name that matches none of `names`: the closest ones by
/// edit distance (or containing each other), else the names themselves,
/// the first 10 and how many more.
pub fn did_you_mean<'a>(name: &str, names: impl Iterator<Item = &'a str>, what: &str) -> String {
    let names: Vec<&str> = names.collect();
    let limit = (name.chars().count() / 3).max(1);
    let mut close: Vec<(usize, &str)> = names
        .iter()
        .map(|&s| (strsim::osa_distance(name, s), s))
        .filter(|&(d, s)| d <= limit || (s.len() >= 3 && name.contains(s)) || s.contains(name))
        .collect();
    close.sort();
    close.dedup_by_key(|c| c.1);
    if close.is_empty() {
        let shown: Vec<&str> = names.iter().copied().take(10).collect();
        let more = match names.len().saturating_sub(10) {
            0 => String::new(),
            n => format!(" … and {n} more"),
        };
        format!("{what}: {}{more}", shown.join(", "))
    } else {
        let close: Vec<&str> = close.iter().take(3).map(|c| c.1).collect();
        format!("did you mean {}?", close.join(" or "))
    }
}

/// Iterative DFS; returns the stages of one cycle, the first repeated at the end.
fn find_cycle(upstream: &[Vec<usize>]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    let n = upstream.len();
    let mut mark = vec![Mark::New; n];
    let mut parent = vec![usize::MAX; n];
    for root in 0..n {
        if mark[root] != Mark::New {
            continue;
        }
        let mut stack = vec![(root, 0usize)];
        mark[root] = Mark::Open;
        while let Some(&mut (v, ref mut next)) = stack.last_mut() {
            if *next < upstream[v].len() {
                let w = upstream[v][*next];
                *next += 1;
                match mark[w] {
                    Mark::New => {
                        mark[w] = Mark::Open;
                        parent[w] = v;
                        stack.push((w, 0));
                    }
                    Mark::Open => {
                        // v reads w and w is an open ancestor: each stage on the DFS
                        // path flows into its parent, and w flows into v.
                        let mut out = vec![v];
                        let mut x = v;
                        while x != w {
                            x = parent[x];
                            out.push(x);
                        }
                        // Start at the stage declared first, for a stable message.
                        let first = (0..out.len()).min_by_key(|&k| out[k]).unwrap_or(0);
                        out.rotate_left(first);
                        out.push(out[0]);
                        return Some(out);
                    }
                    Mark::Done => {}
                }
            } else {
                mark[v] = Mark::Done;
                stack.pop();
            }
        }
    }
    None
}

fn topo_order(upstream: &[Vec<usize>], downstream: &[Vec<usize>]) -> Vec<usize> {
    let n = upstream.len();
    let mut indeg: Vec<usize> = upstream.iter().map(Vec::len).collect();
    let mut ready: BTreeSet<usize> = (0..n).filter(|&i| indeg[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &d in &downstream[i] {
            indeg[d] -= 1;
            if indeg[d] == 0 {
                ready.insert(d);
            }
        }
    }
    order
}

impl Graph {
    /// For each stage, how many stages the longest chain from it to a last
    /// stage holds, itself included: the local back-end starts the waiting
    /// stage with the longest chain first, so that a long chain does not
    /// wait behind a short branch that became ready earlier.
    pub fn chain_lengths(&self) -> Vec<u32> {
        let mut length = vec![1u32; self.order.len()];
        for &i in self.order.iter().rev() {
            if let Some(longest) = self.downstream[i].iter().map(|&d| length[d]).max() {
                length[i] = longest + 1;
            }
        }
        length
    }

    /// The stages to consider for `targets` (names): those and all they need.
    /// No targets means every stage.
    pub fn select(&self, p: &Pipeline, targets: &[String]) -> Result<Vec<bool>> {
        let n = p.stages.len();
        if targets.is_empty() {
            return Ok(vec![true; n]);
        }
        let mut keep = vec![false; n];
        let mut stack = Vec::new();
        for t in targets {
            // A name from the file stands for all its fan-out and sweep copies.
            let copies: Vec<usize> = match p.index.get(t.as_str()) {
                Some(&i) => vec![i],
                None => (0..n).filter(|&i| p.stages[i].answers_to(t)).collect(),
            };
            if copies.is_empty() {
                return Err(crate::Error::Invalid(format!(
                    "{}: there is no stage `{t}`; {}",
                    p.path.display(),
                    suggest(t, p)
                )));
            }
            stack.extend(copies);
        }
        while let Some(i) = stack.pop() {
            if !keep[i] {
                keep[i] = true;
                stack.extend(&self.upstream[i]);
            }
        }
        Ok(keep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_lengths_count_the_longest_way_to_a_last_stage() {
        // prep -> vq1 -> codes1 -> vq2 -> decoder1; prep -> baseline; and
        // codes1 -> decoder1 too.
        let upstream = vec![vec![], vec![0], vec![1], vec![2], vec![2, 3], vec![0]];
        let mut downstream = vec![Vec::new(); upstream.len()];
        for (i, ups) in upstream.iter().enumerate() {
            for &u in ups {
                downstream[u].push(i);
            }
        }
        let order = topo_order(&upstream, &downstream);
        let g = Graph {
            upstream,
            downstream,
            order,
        };
        assert_eq!(g.chain_lengths(), vec![5, 4, 3, 2, 1, 1]);
    }

    #[test]
    fn hints_suggest_by_edit_distance_and_say_how_many_are_left_out() {
        let names = ["prep", "codes1", "codes2", "vq1"];
        assert_eq!(
            did_you_mean("codez1", names.into_iter(), "stages"),
            "did you mean codes1 or codes2?"
        );
        assert_eq!(
            did_you_mean("vq", names.into_iter(), "stages"),
            "did you mean vq1?"
        );
        let many: Vec<String> = (0..14).map(|i| format!("stage{i}")).collect();
        let hint = did_you_mean(
            "zzzzzzzzzz",
            many.iter().map(String::as_str),
            "stages in this file",
        );
        assert!(
            hint.starts_with("stages in this file: stage0, stage1,"),
            "{hint}"
        );
        assert!(hint.ends_with("stage9 … and 4 more"), "{hint}");
    }

    #[test]
    fn cycle_is_reported_in_flow_order() {
        // 0 reads 2, 1 reads 0, 2 reads 1: flow 2 -> 0 -> 1 -> 2.
        let up = vec![vec![2], vec![0], vec![1]];
        let c = find_cycle(&up).unwrap();
        assert_eq!(c.len(), 4);
        assert_eq!(c.first(), c.last());
        for w in c.windows(2) {
            // each next stage reads the previous one
            assert!(up[w[1]].contains(&w[0]), "{c:?}");
        }
    }

    #[test]
    fn no_cycle_in_a_diamond() {
        let up = vec![vec![], vec![0], vec![0], vec![1, 2]];
        assert!(find_cycle(&up).is_none());
        let mut down = vec![Vec::new(); 4];
        for (i, u) in up.iter().enumerate() {
            for &j in u {
                down[j].push(i);
            }
        }
        assert_eq!(topo_order(&up, &down), vec![0, 1, 2, 3]);
    }

    #[test]
    fn overlap_is_by_path_component() {
        assert!(path_overlaps("data/x", "data"));
        assert!(path_overlaps("data", "data/x"));
        assert!(!path_overlaps("data2", "data"));
    }
}
