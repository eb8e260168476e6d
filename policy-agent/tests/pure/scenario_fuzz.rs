//! Nothing panics on bad input: arbitrary text and mutated scenario files are either rejected
//! with an error or run to a report.

use std::path::Path;

use policy_testkit::scenario::simulate::KernelModelOracle;
use policy_testkit::scenario::{Plan, run_plan};
use proptest::prelude::*;

fn corpus() -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .join("scenarios");
    let mut texts = Vec::new();
    for dir in ["seed", "traps"] {
        let mut files: Vec<_> = std::fs::read_dir(root.join(dir))
            .expect("scenario dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        files.sort();
        for f in files {
            texts.push(std::fs::read_to_string(f).expect("read"));
        }
    }
    assert!(texts.len() >= 10);
    texts
}

#[derive(Clone, Debug)]
enum Mutation {
    DeleteLine(usize),
    DuplicateLine(usize),
    Replace(usize, char),
    Insert(usize, String),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let chars = prop::sample::select(vec![
        '{', '}', '[', ']', ':', ',', '-', '*', '/', '>', '"', '\'', ' ', '\n', '0', '9', 'a', '&',
        '!', '|', '#', '\t', 'é',
    ]);
    prop_oneof![
        any::<usize>().prop_map(Mutation::DeleteLine),
        any::<usize>().prop_map(Mutation::DuplicateLine),
        (any::<usize>(), chars).prop_map(|(i, c)| Mutation::Replace(i, c)),
        (
            any::<usize>(),
            prop::sample::select(vec![
                "{{ip x/a}}",
                "{{ip6",
                "}}",
                "{{ip nope/nope}}",
                "0",
                "-1",
                "65536",
                "null",
                "~",
                "[]",
                "{}",
                "TCP/99999",
                "external:",
                "*/*/*",
                " -> ",
                "endPort: 1",
                "port: web",
                "cidr: ::/0",
                "kind: Pod",
                "---",
                "except: [0.0.0.0/0]",
            ])
        )
            .prop_map(|(i, s)| Mutation::Insert(i, s.to_string())),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn char_boundary(text: &str, i: usize) -> usize {
    let mut i = i % (text.len() + 1);
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn mutate(text: &str, muts: &[Mutation]) -> String {
    let mut t = text.to_string();
    for m in muts {
        let lines: Vec<&str> = t.lines().collect();
        t = match m {
            Mutation::DeleteLine(i) if !lines.is_empty() => {
                let k = i % lines.len();
                lines
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != k)
                    .map(|(_, l)| *l)
                    .collect::<Vec<_>>()
                    .join("\n")
            }
            Mutation::DuplicateLine(i) if !lines.is_empty() => {
                let k = i % lines.len();
                let mut v = lines.clone();
                v.insert(k, lines[k]);
                v.join("\n")
            }
            Mutation::Replace(i, c) => {
                let at = char_boundary(&t, *i);
                let mut s = t.clone();
                if at < s.len() {
                    let len = s[at..].chars().next().map_or(0, char::len_utf8);
                    s.replace_range(at..at + len, &c.to_string());
                }
                s
            }
            Mutation::Insert(i, ins) => {
                let at = char_boundary(&t, *i);
                let mut s = t.clone();
                s.insert_str(at, ins);
                s
            }
            Mutation::Truncate(i) => t[..char_boundary(&t, *i)].to_string(),
            _ => t.clone(),
        };
    }
    t
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn arbitrary_text_never_panics(text in ".{0,400}") {
        let _ = Plan::parse("fuzz.yaml", &text);
    }

    #[test]
    fn mutated_scenarios_never_panic(pick in any::<prop::sample::Index>(), muts in prop::collection::vec(mutation(), 1..4)) {
        let corpus = corpus();
        let text = mutate(&corpus[pick.index(corpus.len())], &muts);
        match Plan::parse("fuzz.yaml", &text) {
            Err(e) => prop_assert!(e.to_string().starts_with("fuzz.yaml: "), "{e}"),
            Ok(plan) => {
                let mut out = Vec::new();
                run_plan(&plan, &mut KernelModelOracle::default(), &mut out).expect("simulation runs");
            }
        }
    }
}
