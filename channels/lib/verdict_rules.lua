-- The rule that decides, from a radiologist's signed report, whether each
-- AI finding of the study was confirmed or overridden (require "verdict_rules").
--
-- Per finding, in this order:
--   1. A coded observation: an OBX of the report (not preliminary, OBX-11
--      not P) whose code (OBX-3.1) is the finding's code, with a value
--      that says present or absent (M.present / M.absent: Y/N, POS/NEG,
--      PRESENT/ABSENT, SNOMED CT Yes/No, ...). Present confirms, absent
--      overrides.
--   2. The report's words: the impression (OBX 19005-8, or what follows an
--      "IMPRESSION:" heading), else, when the impression does not mention
--      the finding, the whole report text. A mention is one of the
--      finding's terms (the terms table: finding_terms.csv, by code) as
--      whole words. A mention is negated when, in the same sentence, a
--      negation comes before it (M.negations: "no", "without", "negative
--      for", ...) with no "but"/"however" (M.terminators) in between, or a
--      negation follows it ("... is not seen", "... excluded":
--      M.negations_after). Phrases that sound negative but are not
--      ("cannot be excluded", "no change in": M.not_negations) keep the
--      mention affirmed. Any affirmed mention confirms; only negated
--      mentions override.
--   3. A finding the report does not mention at all is M.unmentioned
--      ("overridden": the radiologist signed a report without it; set it
--      to nil to record no verdict).
-- Every decision comes with a note saying which rule decided and on what
-- text, kept with the verdict and in the audit trail.
local M = {}

-- Coded values (OBX-5.1, else OBX-5.2), upper-cased.
M.present = {
  Y = true, YES = true, POS = true, POSITIVE = true, PRESENT = true, DETECTED = true,
  CONFIRMED = true, TRUE = true,
  ["373066001"] = true, -- SNOMED CT Yes
  ["52101004"] = true,  -- SNOMED CT Present
  ["10828004"] = true,  -- SNOMED CT Positive
}
M.absent = {
  N = true, NO = true, NEG = true, NEGATIVE = true, ABSENT = true, ["NOT DETECTED"] = true,
  ["NOT PRESENT"] = true, FALSE = true,
  ["373067005"] = true, -- SNOMED CT No
  ["2667000"] = true,   -- SNOMED CT Absent
  ["260385009"] = true, -- SNOMED CT Negative
}

-- Words and phrases (lower case, whole words) that negate a term after them
-- in the same sentence.
M.negations = {
  "no", "not", "without", "negative for", "no evidence of", "no sign of", "no signs of",
  "free of", "absence of", "absent", "rules out", "ruled out", "resolution of", "nor",
}
-- ... that negate a term before them in the same sentence.
M.negations_after = {
  "is absent", "are absent", "not seen", "not identified", "not present", "not demonstrated",
  "not visualized", "not visualised", "not detected", "excluded", "ruled out", "has resolved",
  "have resolved", "resolved", "none", "negative",
}
-- Phrases that contain a negation but do not deny the finding: a sentence
-- with one of them keeps its mentions affirmed.
M.not_negations = {
  "cannot be excluded", "can not be excluded", "cannot exclude", "can not exclude",
  "not excluded", "cannot be ruled out", "cannot rule out", "not ruled out",
  "not be ruled out", "not be excluded", "no change in", "no significant change in",
  "no interval change in", "not significantly changed", "no increase in", "no decrease in",
}
-- Words that end a negation's reach within a sentence.
M.terminators = {
  "but", "however", "although", "though", "except", "apart from", "aside from",
  "with the exception of", "yet", "whereas",
}
-- Report sections whose OBX code marks the impression (LOINC).
M.impression_codes = {["19005-8"] = true, ["&IMP"] = true, IMP = true}
-- What a finding the report does not mention gets (nil: no verdict).
M.unmentioned = "overridden"

-- ---- text --------------------------------------------------------------------

-- Lower case, words separated by single spaces, padded: " no acute bleed ".
local function words(s)
  return " " .. s:lower():gsub("[^%w]+", " "):gsub("^ +", ""):gsub(" +$", "") .. " "
end

-- Sentences of a text, as given (for notes) and as words.
local function sentences(text)
  local out = {}
  for raw in (text .. "\n"):gmatch("([^%.;!?\n\r]*)[%.;!?\n\r]") do
    local w = words(raw)
    if w ~= "  " then out[#out + 1] = {text = raw:gsub("^%s+", ""):gsub("%s+$", ""), words = w} end
  end
  return out
end

-- The positions (in w) where any phrase of list starts, in order.
local function positions(w, list)
  local out = {}
  for _, phrase in ipairs(list) do
    local at = 1
    while true do
      local i = w:find(" " .. phrase .. " ", at, true)
      if not i then break end
      out[#out + 1] = {i, i + #phrase + 1}
      at = i + 1
    end
  end
  table.sort(out, function(a, b) return a[1] < b[1] end)
  return out
end

-- w with every phrase of M.not_negations blotted out (same length), so
-- that the negations inside them ("cannot be excluded") are not seen.
local function masked(w)
  for _, p in ipairs(M.not_negations) do
    local at = 1
    while true do
      local i = w:find(" " .. p .. " ", at, true)
      if not i then break end
      w = w:sub(1, i) .. (p:gsub("%S", "_")) .. w:sub(i + #p + 1)
      at = i + 1
    end
  end
  return w
end

-- How a sentence (words w) speaks of a term at positions i..e (its
-- surrounding spaces): "affirmed" or "negated".
local function polarity(w, i, e)
  w = masked(w)
  -- before the term: the nearest terminator bounds the negation's reach
  local before = w:sub(1, i)
  local from = 1
  for _, t in ipairs(positions(before, M.terminators)) do from = t[2] end
  if #positions(before:sub(from), M.negations) > 0 then return "negated" end
  -- after the term, up to the next terminator
  local after = w:sub(e)
  local stop = positions(after, M.terminators)[1]
  if stop then after = after:sub(1, stop[1]) end
  if #positions(after, M.negations_after) > 0 then return "negated" end
  return "affirmed"
end

-- The finding's terms: "a|b|c" from the terms table, else its label and meaning.
local function terms_of(finding, terms)
  local row = terms and finding.code and terms[finding.code.code]
  local list = {}
  local text = row and row.terms or ""
  if text == "" then
    text = (finding.code and finding.code.meaning or "") .. "|" .. (finding.label or "")
  end
  for t in text:gmatch("[^|]+") do
    local w = words(t)
    if w ~= "  " then list[#list + 1] = w:sub(2, -2) end
  end
  return list
end

-- What a text says of the terms: "affirmed" (with the sentence),
-- "negated" (with the sentence), or nil when it does not mention them.
local function read(text, list)
  local negated
  for _, s in ipairs(sentences(text)) do
    for _, t in ipairs(list) do
      local at = 1
      while true do
        local i = s.words:find(" " .. t .. " ", at, true)
        if not i then break end
        if polarity(s.words, i, i + #t + 1) == "affirmed" then return "affirmed", s.text end
        negated = negated or s.text
        at = i + 1
      end
    end
  end
  if negated then return "negated", negated end
  return nil
end

local function clip(s)
  if #s > 200 then return s:sub(1, 197) .. "..." end
  return s
end

-- ---- the report --------------------------------------------------------------

-- The reports of msg, one per OBR: its OBX occurrences (those after it,
-- up to the next OBR), status (OBR-25), accession numbers (OBR-18, OBR-3),
-- Study Instance UID (OBX 113014), signing radiologist (OBR-32: ID, else
-- family name).
function M.reports(msg)
  local out, cur = {}, nil
  local nobr, nobx = 0, 0
  for _, name in msg:segments() do
    if name == "OBR" then
      nobr = nobr + 1
      local p = "OBR[" .. nobr .. "]"
      local function get(f) local v = msg:get(p .. f) or "" if v == '""' then v = "" end return v end
      cur = {
        obr = nobr,
        status = get("-25"),
        accessions = {},
        observed = get("-7"),
        radiologist = get("-32.1.1") ~= "" and get("-32.1.1") or get("-32.1.2"),
        obx = {},
      }
      for _, f in ipairs({"-18.1", "-3.1"}) do
        local v = get(f)
        if v ~= "" then cur.accessions[#cur.accessions + 1] = v end
      end
      out[#out + 1] = cur
    elseif name == "OBX" then
      nobx = nobx + 1
      if cur then
        cur.obx[#cur.obx + 1] = nobx
        if msg:get("OBX[" .. nobx .. "]-3.1") == "113014" then
          cur.study_uid = msg:get("OBX[" .. nobx .. "]-5")
        end
      end
    end
  end
  return out
end

-- The text of an OBX: every repetition of OBX-5, one line each.
local function obx_text(msg, n)
  local p = "OBX[" .. n .. "]-5"
  local parts = {}
  for r = 1, math.max(msg:repetitions(p), 1) do
    parts[#parts + 1] = msg:get(p .. "[" .. r .. "]") or ""
  end
  return table.concat(parts, "\n")
end

-- The report's text (TX, FT, ST, TEXT observations that are not
-- preliminary, not the Study UID, not coded findings) and its impression.
local function texts(msg, report, codes)
  local all, impression = {}, {}
  for _, n in ipairs(report.obx) do
    local p = "OBX[" .. n .. "]"
    local vt, code = msg:get(p .. "-2"), msg:get(p .. "-3.1")
    if (vt == "TX" or vt == "FT" or vt == "ST" or vt == "TEXT") and msg:get(p .. "-11") ~= "P"
        and code ~= "113014" and not codes[code] then
      local t = obx_text(msg, n)
      all[#all + 1] = t
      if M.impression_codes[code] then impression[#impression + 1] = t end
    end
  end
  local whole = table.concat(all, "\n")
  local imp = table.concat(impression, "\n")
  if imp == "" then
    local i = whole:lower():find("impression%s*:")
    if i then imp = whole:sub(i) end
  end
  return whole, imp
end

-- The coded observation of a finding's code, when the report has one:
-- "present" or "absent", and the value.
local function coded(msg, report, code)
  for _, n in ipairs(report.obx) do
    local p = "OBX[" .. n .. "]"
    if msg:get(p .. "-3.1") == code and msg:get(p .. "-11") ~= "P" then
      for _, f in ipairs({"-5.1", "-5.2"}) do
        local v = (msg:get(p .. f) or ""):upper():gsub("^%s+", ""):gsub("%s+$", "")
        if M.present[v] then return "present", v, n end
        if M.absent[v] then return "absent", v, n end
      end
    end
  end
  return nil
end

-- The verdict on each finding (a list as ai.findings returns it) from
-- report (of M.reports): a list of {finding, verdict, note}; a finding
-- left without a verdict (M.unmentioned nil) is not in it.
function M.decide(msg, report, findings, terms)
  local codes = {}
  for _, f in ipairs(findings) do
    if f.code and f.code.code then codes[f.code.code] = true end
  end
  local whole, impression = texts(msg, report, codes)
  local out = {}
  for _, f in ipairs(findings) do
    local verdict, note
    local state, value, n = coded(msg, report, f.code and f.code.code or "")
    if state then
      verdict = state == "present" and "confirmed" or "overridden"
      note = string.format("coded: OBX %d %s = %s", n, f.code.code, value)
    else
      local list = terms_of(f, terms)
      local where, said, sentence = "impression", read(impression, list)
      if not said then
        where = "report"
        said, sentence = read(whole, list)
      end
      if said == "affirmed" then
        verdict, note = "confirmed", where .. ": \"" .. clip(sentence) .. "\""
      elseif said == "negated" then
        verdict, note = "overridden", "negated in the " .. where .. ": \"" .. clip(sentence) .. "\""
      elseif M.unmentioned then
        verdict, note = M.unmentioned, "not mentioned in the report"
      end
    end
    if verdict then out[#out + 1] = {finding = f, verdict = verdict, note = note} end
  end
  return out
end

return M
