// Adapters that put each npm HL7 v2 library behind one interface, so that the
// benchmark does the same work with every library:
//
//   parse(text)          -> library's message object
//   read(caseName, msg)  -> the ten values of parse_read10, as raw ER7 strings
//   serialize(msg)       -> ER7 text, or undefined when the library has no writer
//
// The ten values (the C benchmark reads the same ones):
//   adt_a01: MSH-9.1, MSH-9.2, MSH-10, PID-3 rep1 comp1, PID-3 rep2 comp1,
//            PID-5.1, PID-5.2, PID-7, PV1-3.1, PV1-19
//   oru_big: MSH-9.2, MSH-10, PID-3 rep1 comp1, PID-3 rep2 comp1, PID-5.1,
//            OBR-3, OBR-4.1, OBR-25, OBX(first)-3.1, OBX(first with OBX-2 = ED)-5.5
// A reference without a component (MSH-10, PID-7, PV1-19, OBR-3, OBR-25) means
// the whole field as it stands in the message, separators included; a component
// means its whole text, subcomponent separators included; values are raw (not
// unescaped). Libraries that hand out structured values get them joined back
// with the message's separators, which is part of the measured work.
//
// Only adapters whose package is installed in tests/peers/node_modules run;
// the others document what was tried (see tests/bench/peers/README.md).

const CR = '\r';

// ---------------------------------------------------------------- helpers
function firstWhere(list, pred) {
  for (let i = 0; i < list.length; i++) if (pred(list[i])) return list[i];
  return undefined;
}
// Libraries that do not know about repetitions leave the '~' inside a
// component; rebuild the field text and split it ourselves.
function repComp1(fieldText, rep) {
  const r = fieldText.split('~')[rep - 1] ?? '';
  const i = r.indexOf('^');
  return i < 0 ? r : r.slice(0, i);
}
function stripTrailingCR(text) {
  return text.charCodeAt(text.length - 1) === 13 ? text.slice(0, -1) : text;
}

// hl7parser and node-hl7-client parse lazily and keep each node's text: an
// unmodified message's toString()/toRaw() hands back the input string without
// any work. To measure a real parse + serialize, parse_serialize walks the tree
// down to the components (materializing every segment, field, repetition,
// component and subcomponent, as an eager parser does) and marks every
// component modified, so that the library rebuilds the whole text from its tree.
function materializeAll(node, depth) {
  const ch = node.children;
  if (depth === 4) { node.setDirty(); return; } // component; its children are subcomponents
  for (let i = 0; i < ch.length; i++) materializeAll(ch[i], depth + 1);
}
const LAZY_NOTE = 'lazy parser: tree fully materialized and marked modified before serializing (unmodified, it returns the input text)';

// ---------------------------------------------------------------- adapters
export const adapters = {};

// hl7parser (artifacthealth): lazy tree, toRaw() gives raw text.
// Rejects a message that ends with the segment terminator (empty segment:
// "Segment must have a name"), so the trailing CR is cut before parsing.
adapters['hl7parser'] = {
  pkg: 'hl7parser',
  load: (req) => req('hl7parser'),
  make(lib) {
    return {
      parse: (text) => lib.create(stripTrailingCR(text)),
      read(c, m) {
        const pid3 = m.get('PID.3');
        const r = [];
        if (c === 'adt_a01') {
          r.push(m.get('MSH.9.1').toRaw(), m.get('MSH.9.2').toRaw(), m.get('MSH.10').toRaw());
        } else {
          r.push(m.get('MSH.9.2').toRaw(), m.get('MSH.10').toRaw());
        }
        r.push(pid3.get(0).get(0).toRaw(), pid3.get(1).get(0).toRaw(), m.get('PID.5.1').toRaw());
        if (c === 'adt_a01') {
          r.push(m.get('PID.5.2').toRaw(), m.get('PID.7').toRaw(), m.get('PV1.3.1').toRaw(), m.get('PV1.19').toRaw());
        } else {
          r.push(m.get('OBR.3').toRaw(), m.get('OBR.4.1').toRaw(), m.get('OBR.25').toRaw(), m.get('OBX.3.1').toRaw());
          const obx = m.get('OBX');
          let ed;
          for (let i = 0; i < obx.length; i++) {
            const s = obx.get(i);
            if (s.get('OBX.2').toRaw() === 'ED') { ed = s; break; }
          }
          r.push(ed.get('OBX.5.5').toRaw());
        }
        return r;
      },
      serialize: (m) => { materializeAll(m, 0); return m.toRaw(); },
      serializeNote: LAZY_NOTE + '; a trailing CR is refused by its parser, so cut',
      readNote: 'trailing CR cut before parsing (the parser refuses it)',
    };
  },
};

// node-hl7-client (Bugs5382): hl7parser's design rewritten in TypeScript.
adapters['node-hl7-client'] = {
  pkg: 'node-hl7-client',
  load: (req) => req('node-hl7-client'),
  make(lib) {
    const { Message } = lib;
    return {
      parse: (text) => new Message({ text }),
      read(c, m) {
        const pid3 = m.get('PID.3');
        const r = [];
        if (c === 'adt_a01') {
          r.push(m.get('MSH.9.1').toRaw(), m.get('MSH.9.2').toRaw(), m.get('MSH.10').toRaw());
        } else {
          r.push(m.get('MSH.9.2').toRaw(), m.get('MSH.10').toRaw());
        }
        r.push(pid3.get(0).get(0).toRaw(), pid3.get(1).get(0).toRaw(), m.get('PID.5.1').toRaw());
        if (c === 'adt_a01') {
          r.push(m.get('PID.5.2').toRaw(), m.get('PID.7').toRaw(), m.get('PV1.3.1').toRaw(), m.get('PV1.19').toRaw());
        } else {
          r.push(m.get('OBR.3').toRaw(), m.get('OBR.4.1').toRaw(), m.get('OBR.25').toRaw(), m.get('OBX.3.1').toRaw());
          const obx = m.get('OBX');
          let ed;
          for (let i = 0; i < obx.length; i++) {
            const s = obx.get(i);
            if (s.get('2').toRaw() === 'ED') { ed = s; break; }
          }
          r.push(ed.get('5.5').toRaw());
        }
        return r;
      },
      serialize: (m) => { materializeAll(m, 0); return m.toString(); },
      serializeNote: LAZY_NOTE,
    };
  },
};

// @medplum/hl7: the parser is Hl7Message from @medplum/core (a dependency of
// @medplum/hl7, same version). Eager: fields are split into components.
adapters['@medplum/hl7'] = {
  pkg: '@medplum/hl7',
  load: (req) => {
    req('@medplum/hl7');
    // @medplum/core is @medplum/hl7's own dependency, resolved from there.
    const { createRequire } = req('node:module');
    return createRequire(req.resolve('@medplum/hl7'))('@medplum/core');
  },
  make(lib) {
    const { Hl7Message } = lib;
    return {
      parse: (text) => Hl7Message.parse(text),
      read(c, m) {
        const msh = m.getSegment('MSH');
        const pid3 = m.getSegment('PID').getField(3);
        const pid5 = m.getSegment('PID').getField(5);
        const r = [];
        if (c === 'adt_a01') r.push(msh.getField(9).getComponent(1));
        r.push(msh.getField(9).getComponent(2), msh.getField(10).toString());
        // getComponent(component, subcomponent, repetition): repetition is 0-based
        r.push(pid3.getComponent(1, undefined, 0), pid3.getComponent(1, undefined, 1), pid5.getComponent(1));
        if (c === 'adt_a01') {
          const pv1 = m.getSegment('PV1');
          r.push(pid5.getComponent(2), m.getSegment('PID').getField(7).toString(),
            pv1.getField(3).getComponent(1), pv1.getField(19).toString());
        } else {
          const obr = m.getSegment('OBR');
          const obxs = m.getAllSegments('OBX');
          const ed = firstWhere(obxs, (s) => s.getField(2).toString() === 'ED');
          r.push(obr.getField(3).toString(), obr.getField(4).getComponent(1), obr.getField(25).toString(),
            obxs[0].getField(3).getComponent(1), ed.getField(5).getComponent(5));
        }
        return r;
      },
      serialize: (m) => m.toString(),
    };
  },
};

// simple-hl7: eager; the MSH header keeps fields from MSH-3 on (index 0).
adapters['simple-hl7'] = {
  pkg: 'simple-hl7',
  load: (req) => req('simple-hl7'),
  make(lib) {
    const parser = new lib.Parser();
    const delims = { componentSeperator: '^', subcomponentSeperator: '&', repititionCharacter: '~' };
    // component c (1-based) of repetition r (1-based) of a field object
    const comp = (field, r, c) => {
      let rep = field.value[r - 1];
      if (rep && !Array.isArray(rep)) rep = rep.value[0]; // repeated field: each rep is a field
      return rep && rep[c - 1] ? rep[c - 1].toString(delims) : '';
    };
    return {
      parse: (text) => parser.parse(text),
      read(c, m) {
        const h = m.header;
        const pid = m.getSegment('PID');
        const r = [];
        // header.fields[0] is MSH-3, so MSH-n is fields[n - 3] and getField(n - 2)
        if (c === 'adt_a01') r.push(comp(h.fields[6], 1, 1));
        r.push(comp(h.fields[6], 1, 2), h.getField(8));
        r.push(comp(pid.fields[2], 1, 1), comp(pid.fields[2], 2, 1), comp(pid.fields[4], 1, 1));
        if (c === 'adt_a01') {
          const pv1 = m.getSegment('PV1');
          r.push(comp(pid.fields[4], 1, 2), pid.getField(7), comp(pv1.fields[2], 1, 1), pv1.getField(19));
        } else {
          const obr = m.getSegment('OBR');
          const obxs = m.getSegments('OBX');
          const ed = firstWhere(obxs, (s) => s.getField(2) === 'ED');
          r.push(obr.getField(3), comp(obr.fields[3], 1, 1), obr.getField(25),
            comp(obxs[0].fields[2], 1, 1), comp(ed.fields[4], 1, 5));
        }
        return r;
      },
      serialize: (m) => m.toString(),
    };
  },
};

// hl7-standard (Iron Bridge): values keyed 'PID.3.1'; composite fields come
// back as objects and repeated fields as arrays of objects, which we join back.
adapters['hl7-standard'] = {
  pkg: 'hl7-standard',
  load: (req) => req('hl7-standard'),
  make(HL7) {
    const joinComp = (v) => (Array.isArray(v) ? v.join('&') : v);
    const joinRep = (v) => {
      if (typeof v === 'string') return v;
      let s = '';
      let first = true;
      for (const k in v) { s += (first ? '' : '^') + joinComp(v[k]); first = false; }
      return s;
    };
    const joinField = (v) => (Array.isArray(v) ? v.map(joinRep).join('~') : joinRep(v));
    return {
      parse: (text) => { const m = new HL7(text, { lineEndings: CR }); m.transform(); return m; },
      read(c, m) {
        const r = [];
        if (c === 'adt_a01') r.push(m.get('MSH.9.1'));
        r.push(m.get('MSH.9.2'), joinField(m.get('MSH.10')));
        // get(field, segmentIndex, repetitionIndex)
        r.push(joinComp(m.get('PID.3.1', 0, 0)), joinComp(m.get('PID.3.1', 0, 1)), joinComp(m.get('PID.5.1')));
        if (c === 'adt_a01') {
          r.push(joinComp(m.get('PID.5.2')), joinField(m.get('PID.7')), joinComp(m.get('PV1.3.1')), joinField(m.get('PV1.19')));
        } else {
          const obxs = m.getSegments('OBX');
          const ed = firstWhere(obxs, (s) => s.get('OBX.2') === 'ED');
          r.push(joinField(m.get('OBR.3')), joinComp(m.get('OBR.4.1')), joinField(m.get('OBR.25')),
            joinComp(obxs[0].get('OBX.3')['OBX.3.1']), joinComp(ed.get('OBX.5')['OBX.5.5']));
        }
        return r;
      },
      serialize: (m) => m.build(),
      readNote: 'composite values are objects, joined back by the adapter',
    };
  },
};

// tiny-hl7: flat objects keyed 'PID.5.1'; values unescaped; no repetition
// support ('~' stays inside a component), so PID-3 is rebuilt and split here.
adapters['tiny-hl7'] = {
  pkg: 'tiny-hl7',
  load: (req) => req('tiny-hl7'),
  make(lib) {
    const fieldText = (seg, key) => {
      if (key in seg) return seg[key];
      const pre = key + '.';
      if (key.split('.').length === 3) { // a component split into subcomponents
        let s = '';
        let first = true;
        for (const k in seg) if (k.startsWith(pre)) { s += (first ? '' : '&') + seg[k]; first = false; }
        return s;
      }
      let s = '';
      let lastComp = null;
      for (const k in seg) {
        if (!k.startsWith(pre)) continue;
        const rest = k.slice(pre.length);
        const dot = rest.indexOf('.');
        const compNo = dot < 0 ? rest : rest.slice(0, dot);
        if (lastComp === null) s += seg[k];
        else s += (compNo === lastComp ? '&' : '^') + seg[k];
        lastComp = compNo;
      }
      return s;
    };
    const seg = (m, name) => firstWhere(m, (s) => (name + '.1') in s || (name + '.1.1') in s || (name === 'MSH' && 'MSH.2' in s));
    return {
      parse: (text) => lib.parse(text),
      read(c, m) {
        const msh = m[0];
        const pid = seg(m, 'PID');
        const pid3 = fieldText(pid, 'PID.3');
        const r = [];
        if (c === 'adt_a01') r.push(msh['MSH.9.1']);
        r.push(msh['MSH.9.2'], fieldText(msh, 'MSH.10'));
        r.push(repComp1(pid3, 1), repComp1(pid3, 2), fieldText(pid, 'PID.5.1'));
        if (c === 'adt_a01') {
          const pv1 = seg(m, 'PV1');
          r.push(fieldText(pid, 'PID.5.2'), fieldText(pid, 'PID.7'), fieldText(pv1, 'PV1.3.1'), fieldText(pv1, 'PV1.19'));
        } else {
          const obr = seg(m, 'OBR');
          const obxs = m.filter((s) => 'OBX.2' in s);
          const ed = firstWhere(obxs, (s) => s['OBX.2'] === 'ED');
          r.push(fieldText(obr, 'OBR.3'), fieldText(obr, 'OBR.4.1'), fieldText(obr, 'OBR.25'),
            fieldText(obxs[0], 'OBX.3.1'), fieldText(ed, 'OBX.5.5'));
        }
        return r;
      },
      serialize: (m) => lib.serialize(m),
      readNote: 'no repetitions: PID-3 rebuilt from its components and split on ~ by the adapter; values come unescaped',
    };
  },
};

// @redoxengine/redox-hl7-v2: schema-driven (message structure, groups, data
// types); values nested per data type; objects joined back here.
adapters['@redoxengine/redox-hl7-v2'] = {
  pkg: '@redoxengine/redox-hl7-v2',
  load: (req) => req('@redoxengine/redox-hl7-v2'),
  make(lib) {
    const parser = new lib.Parser();
    const generator = new lib.Generator();
    const join = (v, depth) => {
      if (v === undefined || v === null) return '';
      if (typeof v === 'string') return v;
      if (Array.isArray(v)) return v.map((x) => join(x, depth)).join('~');
      let max = 0;
      for (const k in v) { const n = +k; if (v[k] !== undefined && n > max) max = n; }
      const parts = new Array(max).fill('');
      for (const k in v) if (+k <= max) parts[+k - 1] = join(v[k], depth + 1);
      return parts.join(depth === 0 ? '^' : '&');
    };
    const rep = (v, i) => (Array.isArray(v) ? v[i] : i === 0 ? v : undefined);
    const comp = (field, r, c) => {
      const x = rep(field, r);
      if (x && typeof x === 'object') return join(x[c], 1);
      // a 'varies' field (OBX-5) stays one unsplit string
      if (typeof x === 'string') return c === 1 && x.indexOf('^') < 0 ? x : x.split('^')[c - 1] ?? '';
      return '';
    };
    // find the first segment of that name anywhere in the group tree
    const find = (node, name) => {
      if (node[name] !== undefined) return Array.isArray(node[name]) ? node[name][0] : node[name];
      for (const k in node) {
        const v = node[k];
        if (v && typeof v === 'object' && k.length > 3) {
          const list = Array.isArray(v) ? v : [v];
          for (const g of list) { const s = find(g, name); if (s) return s; }
        }
      }
      return undefined;
    };
    const findAll = (node, name, out) => {
      for (const k in node) {
        const v = node[k];
        if (k === name) { if (Array.isArray(v)) out.push(...v); else out.push(v); }
        else if (v && typeof v === 'object' && k.length > 3) {
          for (const g of Array.isArray(v) ? v : [v]) findAll(g, name, out);
        }
      }
      return out;
    };
    return {
      parse: (text) => parser.parse(text),
      read(c, m) {
        const msh = m.MSH;
        const pid = find(m, 'PID');
        const r = [];
        if (c === 'adt_a01') r.push(comp(msh[9], 0, 1));
        r.push(comp(msh[9], 0, 2), join(msh[10], 0));
        r.push(comp(pid[3], 0, 1), comp(pid[3], 1, 1), comp(pid[5], 0, 1));
        if (c === 'adt_a01') {
          const pv1 = find(m, 'PV1');
          r.push(comp(pid[5], 0, 2), join(pid[7], 0), comp(pv1[3], 0, 1), join(pv1[19], 0));
        } else {
          const obr = find(m, 'OBR');
          const obxs = findAll(m, 'OBX', []);
          const ed = firstWhere(obxs, (s) => join(s[2], 0) === 'ED');
          r.push(join(obr[3], 0), comp(obr[4], 0, 1), join(obr[25], 0), comp(obxs[0][3], 0, 1), comp(ed[5], 0, 5));
        }
        return r;
      },
      serialize: (m) => generator.write(m),
      readNote: 'schema-typed values joined back by the adapter; OBX-5 (varies) is one string, split by the adapter',
    };
  },
};

// hl7 (amida-tech): python-hl7-like nested arrays
// segment[field][repetition][component] (component = string or subcomponent array).
adapters['hl7'] = {
  pkg: 'hl7',
  load: (req) => req('hl7'),
  make(lib) {
    const comp = (f, r, c) => { const x = f?.[r - 1]?.[c - 1]; return x === undefined ? '' : Array.isArray(x) ? x.join('&') : x; };
    const field = (f) => f.map((rep) => rep.map((x) => (Array.isArray(x) ? x.join('&') : x)).join('^')).join('~');
    const seg = (m, n) => firstWhere(m, (s) => s[0] === n);
    return {
      parse: (text) => lib.parseString(text),
      read(c, m) {
        const msh = seg(m, 'MSH');
        const pid = seg(m, 'PID');
        const r = [];
        if (c === 'adt_a01') r.push(comp(msh[9], 1, 1));
        r.push(comp(msh[9], 1, 2), field(msh[10]));
        r.push(comp(pid[3], 1, 1), comp(pid[3], 2, 1), comp(pid[5], 1, 1));
        if (c === 'adt_a01') {
          const pv1 = seg(m, 'PV1');
          r.push(comp(pid[5], 1, 2), field(pid[7]), comp(pv1[3], 1, 1), field(pv1[19]));
        } else {
          const obr = seg(m, 'OBR');
          const obxs = m.filter((s) => s[0] === 'OBX');
          const ed = firstWhere(obxs, (s) => field(s[2]) === 'ED');
          r.push(field(obr[3]), comp(obr[4], 1, 1), field(obr[25]), comp(obxs[0][3], 1, 1), comp(ed[5], 1, 5));
        }
        return r;
      },
      serialize: (m) => lib.serializeJSON(m),
    };
  },
};

// nodehl7 (loksly): async parse (Promise); segment.parts[i] is a string or an
// array of components; no repetition support; no serializer.
adapters['nodehl7'] = {
  pkg: 'nodehl7',
  async: true,
  load: (req) => req('nodehl7'),
  make(Lib) {
    const parser = new Lib({});
    const f = (s, n) => s.parts[s.typeofSegment === 'MSH' ? n - 2 : n - 1];
    const text = (v) => (v === undefined || v === null ? '' : Array.isArray(v) ? v.join('^') : v);
    const comp = (s, n, c) => { const v = f(s, n); return Array.isArray(v) ? v[c - 1] ?? '' : c === 1 ? text(v) : ''; };
    let id = 0;
    return {
      parse: (t) => parser.parse(t, String(++id)),
      read(c, m) {
        const msh = m.get('MSH');
        const pid = m.get('PID');
        const pid3 = text(f(pid, 3));
        const r = [];
        if (c === 'adt_a01') r.push(comp(msh, 9, 1));
        r.push(comp(msh, 9, 2), text(f(msh, 10)));
        r.push(repComp1(pid3, 1), repComp1(pid3, 2), comp(pid, 5, 1));
        if (c === 'adt_a01') {
          const pv1 = m.get('PV1');
          r.push(comp(pid, 5, 2), text(f(pid, 7)), comp(pv1, 3, 1), text(f(pv1, 19)));
        } else {
          const obr = m.get('OBR');
          const obxs = m.getSegments('OBX');
          const ed = firstWhere(obxs, (s) => text(f(s, 2)) === 'ED');
          r.push(text(f(obr, 3)), comp(obr, 4, 1), text(f(obr, 25)), comp(obxs[0], 3, 1), comp(ed, 5, 5));
        }
        return r;
      },
      serialize: undefined,
      readNote: 'async parse; no repetitions: PID-3 split on ~ by the adapter',
    };
  },
};

// hl7v2 (panates): dictionary-typed model (ESM). 1.9.0 does not install (its
// peer hl7v2-dictionary@^1.9.0 is not published), so 1.8.0 + hl7v2-dictionary 1.8.0.
adapters['hl7v2'] = {
  pkg: 'hl7v2',
  esm: true,
  load: async (req) => import(req.resolve('hl7v2')),
  make(lib) {
    const { HL7Message } = lib;
    return {
      parse: (text) => HL7Message.parse(text),
      read(c, m) {
        const msh = m.header;
        const pid = m.getSegment('PID');
        const r = [];
        if (c === 'adt_a01') r.push(msh.field(9).comp(1).toHL7String());
        r.push(msh.field(9).comp(2).toHL7String(), msh.field(10).toHL7String());
        // rep() is 0-based
        r.push(pid.field(3).rep(0).comp(1).toHL7String(), pid.field(3).rep(1).comp(1).toHL7String(), pid.field(5).comp(1).toHL7String());
        if (c === 'adt_a01') {
          const pv1 = m.getSegment('PV1');
          r.push(pid.field(5).comp(2).toHL7String(), pid.field(7).toHL7String(), pv1.field(3).comp(1).toHL7String(), pv1.field(19).toHL7String());
        } else {
          const obr = m.getSegment('OBR');
          let ed;
          for (let i = 0; ; i++) {
            const s = m.getSegment('OBX', i);
            if (!s) break;
            if (s.field(2).toHL7String() === 'ED') { ed = s; break; }
          }
          r.push(obr.field(3).toHL7String(), obr.field(4).comp(1).toHL7String(), obr.field(25).toHL7String(),
            m.getSegment('OBX').field(3).comp(1).toHL7String(), ed.field(5).comp(5).toHL7String());
        }
        return r;
      },
      serialize: (m) => m.toHL7String(),
    };
  },
};
