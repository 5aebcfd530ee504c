//! Temporary naive interval tree (O(n)) used until the real one lands.
#![allow(missing_docs, dead_code)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeKey(u32, u32);
impl NodeKey {
    pub fn to_bits(self) -> u64 {
        (self.0 as u64) << 32 | self.1 as u64
    }
    pub fn from_bits(b: u64) -> Self {
        NodeKey((b >> 32) as u32, b as u32)
    }
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidInterval;
pub struct IntervalTree<V> {
    v: Vec<Option<(u64, u64, V, u32)>>,
    gen: u32,
    len: usize,
}
impl<V> IntervalTree<V> {
    pub fn new() -> Self {
        Self {
            v: Vec::new(),
            gen: 0,
            len: 0,
        }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn insert(&mut self, start: u64, last: u64, value: V) -> Result<NodeKey, InvalidInterval> {
        if start > last {
            return Err(InvalidInterval);
        }
        self.gen += 1;
        self.len += 1;
        self.v.push(Some((start, last, value, self.gen)));
        Ok(NodeKey((self.v.len() - 1) as u32, self.gen))
    }
    pub fn remove(&mut self, k: NodeKey) -> Option<V> {
        match self.v.get_mut(k.0 as usize) {
            Some(slot @ Some(_)) if slot.as_ref().unwrap().3 == k.1 => {
                self.len -= 1;
                slot.take().map(|x| x.2)
            }
            _ => None,
        }
    }
    pub fn get(&self, k: NodeKey) -> Option<(u64, u64, &V)> {
        match self.v.get(k.0 as usize) {
            Some(Some(e)) if e.3 == k.1 => Some((e.0, e.1, &e.2)),
            _ => None,
        }
    }
    pub fn for_each_overlap(
        &self,
        start: u64,
        last: u64,
        mut f: impl FnMut(NodeKey, u64, u64, &V),
    ) {
        let mut hits: Vec<_> = self
            .v
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.as_ref().map(|e| (i, e)))
            .filter(|(_, e)| e.0 <= last && start <= e.1)
            .collect();
        hits.sort_by_key(|(i, e)| (e.0, *i));
        for (i, e) in hits {
            f(NodeKey(i as u32, e.3), e.0, e.1, &e.2)
        }
    }
}
