//! Where a setting is and how a problem with it is reported: a `Place` (its file, its path in
//! that file, for the line, and the rule path that names it) and `Cx`, which collects the
//! diagnostics of every section in the order they are found.
//!
//! Apart from `diagnostic` because it needs the sources and their line lookup, which
//! `source` builds while reporting through `diagnostic`: kept here, the three import one way.
//! Every section writes its locations with this one type instead of its own closures.

use super::diagnostic::Diagnostic;
use super::source::{Origin, Seg, Source, line_of};

/// Collects diagnostics while compiling.
pub(super) struct Cx<'s> {
    sources: &'s [Source],
    diags: Vec<Diagnostic>,
}

impl<'s> Cx<'s> {
    /// A collector that goes on from what loading found (`diags`).
    pub fn new(sources: &'s [Source], diags: Vec<Diagnostic>) -> Self {
        Cx { sources, diags }
    }

    /// Reports `message` about the setting at `place`.
    pub fn err(&mut self, place: &Place, message: impl Into<String>) {
        let src = &self.sources[place.file];
        self.diags.push(Diagnostic {
            file: src.path.clone(),
            line: line_of(&src.text, &place.at),
            rule: place.rule.clone(),
            message: message.into(),
        });
    }

    /// How many problems have been reported so far.
    pub fn reported(&self) -> usize {
        self.diags.len()
    }

    pub fn into_diagnostics(self) -> Vec<Diagnostic> {
        self.diags
    }
}

/// A setting, a table or an array item of the policy: the file it is in, its location in that
/// file (a diagnostic's line is that of the nearest part of it that is written), and the rule
/// path by which diagnostics, traces and decision records name it.
#[derive(Clone, Debug)]
pub(super) struct Place {
    file: usize,
    at: Vec<Seg>,
    rule: String,
}

impl Place {
    /// The table `[name]` of file number `file`.
    pub fn table(file: usize, name: &str) -> Place {
        Place {
            file,
            at: vec![Seg::Key(name.into())],
            rule: name.into(),
        }
    }

    /// Item `origin` of the array `[[array]]`, named by `rule` (`datasets.payments`).
    pub fn item(array: &str, origin: Origin, rule: String) -> Place {
        Place {
            file: origin.file,
            at: vec![Seg::Key(array.into()), Seg::Index(origin.index)],
            rule,
        }
    }

    /// The setting `name` inside this one: both its location and its rule one level down
    /// (`proxy` -> `proxy.listen`).
    pub fn field(&self, name: &str) -> Place {
        Place {
            rule: self.rule_of(name),
            ..self.key(name)
        }
    }

    /// The setting `name` that should be inside this one but is not written: named by its
    /// rule, located at what encloses it.
    pub fn missing(&self, name: &str) -> Place {
        Place {
            rule: self.rule_of(name),
            ..self.clone()
        }
    }

    /// The same rule, located more precisely: at the key `name` inside it (the value that
    /// is wrong, when the rule names what holds it).
    pub fn key(&self, name: &str) -> Place {
        self.deeper(Seg::Key(name.into()))
    }

    /// The same rule, located at element `i` of the list it is.
    pub fn index(&self, i: usize) -> Place {
        self.deeper(Seg::Index(i))
    }

    fn deeper(&self, seg: Seg) -> Place {
        let mut p = self.clone();
        p.at.push(seg);
        p
    }

    /// Its rule path.
    pub fn rule(&self) -> &str {
        &self.rule
    }

    /// The rule path of the setting `name` inside it.
    pub fn rule_of(&self, name: &str) -> String {
        format!("{}.{name}", self.rule)
    }
}
