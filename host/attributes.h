/*
 * attributes: tributary.custom_attributes, which rules call to turn an event's
 * properties into mParticle custom attributes within mParticle's limits.
 *
 *   attrs = tributary.custom_attributes(props, extra, skip...)
 *
 * Every property of props whose value is not cjson.null becomes an attribute,
 * but for those a skip argument names: a string names one property, a table is
 * a set (a property whose name it maps to anything but nil or false is left
 * out); nil and false are passed over; at most MAX_SKIPS names and sets. Each
 * entry of extra (may be nil) that is not null is added as well, unless props
 * has a value of its own under that name. Tables are read raw (lua_next,
 * lua_rawget): their metatables are not consulted.
 *
 * Within mParticle's limits (mparticle.h): a name over 256 characters and a
 * text value over 4,096 are cut after that many, counted as
 * `attribute_truncated` (characters as the JSON writer writes them: a byte
 * that begins no UTF-8 sequence is one, U+FFFD); a name is returned as
 * written, with U+FFFD for such bytes, and of names that are one so (or once
 * cut) the first by name is kept, the others counted as `attribute_dropped`;
 * a list becomes
 * its items joined with "," (tables in it as JSON text, nulls and numbers JSON
 * cannot write left out), an object its JSON text (a number JSON cannot write
 * in it null); a number JSON cannot write (1e400) is left out. Past 100
 * attributes, or ATTRIBUTES_MAX_BYTES of them as JSON text, they are taken in
 * name order (byte order) up to the first that would pass either limit, which
 * is left out with the rest. What is left out is counted as
 * `attribute_dropped`. A list is joined, and an object written, only as far as
 * its first 4,097 characters can reach.
 *
 * This is the loop every event of the shipped rules runs over its twenty or so
 * properties: in C it costs less than half of what it does in Lua (19,600
 * instead of 49,000 instructions per benchmark event, under callgrind).
 */
#ifndef TRIBUTARY_ATTRIBUTES_H
#define TRIBUTARY_ATTRIBUTES_H

#include "mparticle.h"

#include <lua.h>

/* The custom attributes of one event together, names and values as JSON text.
 * mParticle takes a batch of at most 128 KB, and an event whose batch would
 * be larger is invalid_output (see RULES_MAX_OUTPUT_BYTES): 100 attributes
 * within their own limits can reach 1.7 MB, and ten times that as JSON text.
 * The 25 KB this leaves is far more than the rest of the shipped rules' event
 * and batch take. */
#define ATTRIBUTES_MAX_BYTES (100 * 1024)

/* An attribute's text is cut at MPARTICLE_MAX_VALUE_CHARS characters: a text
 * of more bytes than this has more characters than that (a character takes 4
 * at most), so what makes an attribute's text stops here. */
#define ATTRIBUTE_TEXT_BYTES ((MPARTICLE_MAX_VALUE_CHARS + 1) * 4)

/* [-2, +1] Takes text (a function writing a table as an attribute's JSON text,
 * as cjson.encode would but within ATTRIBUTE_TEXT_BYTES; it returns the text
 * and whether it stopped short) and count (as tributary.count) from the top of
 * the stack and pushes tributary.custom_attributes over them. */
void attributes_push(lua_State *L);

/* [-0, +1] Pushes s[0..n) as the JSON writer writes its characters: each byte
 * that begins no UTF-8 sequence as U+FFFD. */
void attributes_push_as_written(lua_State *L, const char *s, size_t n);

#endif
